//! Build targets flick has no architecture module for yet: everything generic compiles, and
//! creating a VM fails with a clear error. Replaced by a real module when one is added.

use crate::memory::GuestMemoryMmap;
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

use super::{Arch, ArchError, ArchExit, DeviceSlot, GuestSetup, HostKind, Legacy, MakeSerial};
use crate::config::{CpuProfile, MachineConfig};
use crate::devices::boot_timer::BootTimer;
use crate::devices::bus::Bus;

/// The architecture of this build target, which flick cannot run guests on.
#[derive(Debug)]
pub struct Unsupported;

fn refuse<T>() -> Result<T, ArchError> {
    Err(ArchError::Unsupported(std::env::consts::ARCH))
}

impl Arch for Unsupported {
    const NAME: &'static str = std::env::consts::ARCH;
    type VcpuConfig = ();
    type VcpuState = ();
    type VmState = ();
    type SaveContext = ();
    type BootEntry = ();

    fn ram_ranges(mem_bytes: u64) -> Vec<(u64, u64)> {
        vec![(0, mem_bytes)]
    }

    fn device_slot(_: usize) -> Option<DeviceSlot> {
        None
    }

    fn effective_profile(profile: CpuProfile, _: HostKind) -> CpuProfile {
        profile
    }

    fn host_cmdline(_: CpuProfile, _: HostKind) -> Option<&'static str> {
        None
    }

    fn setup_vm(_: &VmFd) -> Result<(), ArchError> {
        refuse()
    }

    fn load_guest(_: &GuestSetup<'_>) -> Result<(), ArchError> {
        refuse()
    }

    fn vcpu_configs(
        _: &Kvm,
        _: &VmFd,
        _: &MachineConfig,
        _: CpuProfile,
        _: HostKind,
    ) -> Result<Vec<()>, ArchError> {
        refuse()
    }

    fn configure_vcpu(_: &VcpuFd, _: u8, _: &(), _: Option<&()>) -> Result<(), ArchError> {
        refuse()
    }

    fn legacy_devices(
        _: &VmFd,
        _: &mut Bus,
        _: BootTimer,
        _: MakeSerial<'_>,
    ) -> Result<(Legacy, Bus), ArchError> {
        refuse()
    }

    fn handle_exit(_: VcpuExit<'_>, _: &Bus) -> ArchExit {
        ArchExit::Unknown
    }

    fn stop_location(_: &VcpuFd, _: &GuestMemoryMmap) -> String {
        String::new()
    }

    fn save_context(_: &Kvm) -> Result<(), ArchError> {
        refuse()
    }

    fn save_vcpu(_: &VcpuFd, _: &(), _: &()) -> Result<(), ArchError> {
        refuse()
    }

    fn restore_vcpu(_: &VcpuFd, _: &()) -> Result<(), ArchError> {
        refuse()
    }

    fn save_vm(_: &VmFd) -> Result<(), ArchError> {
        refuse()
    }

    fn restore_vm(_: &VmFd, _: &()) -> Result<(), ArchError> {
        refuse()
    }
}
