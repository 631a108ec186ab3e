//! The architecture interface: everything the generic VMM needs from a CPU architecture, as the
//! [`Arch`] trait, and the implementation for the build target as [`Current`].
//!
//! An architecture owns its guest memory map, how the VM's interrupt controller is created, how
//! a kernel is loaded and its boot structures are written, how vCPUs are configured, the exits
//! only it knows (port I/O on x86), its legacy devices, and the format of its vCPU and VM state
//! in snapshots. Generic code (`kvm`, `vmm`, `snapshot`) names no architecture concept and
//! reaches all of this through `Current`.
//!
//! Imports `config`, `devices` and `metrics`; works on raw `kvm-ioctls` handles handed in by the
//! caller; owns no threads.

#[cfg(target_arch = "x86_64")]
pub mod x86_64;
#[cfg(target_arch = "x86_64")]
pub use x86_64::X86_64 as Current;

#[cfg(target_arch = "aarch64")]
pub mod aarch64;
#[cfg(target_arch = "aarch64")]
pub use aarch64::Aarch64 as Current;

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
mod unsupported;
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
pub use unsupported::Unsupported as Current;

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use crate::memory::GuestMemoryMmap;
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use serde::de::DeserializeOwned;
use serde::Serialize;
use vmm_sys_util::eventfd::EventFd;

use crate::config::{BootSourceConfig, CpuProfile, MachineConfig};
use crate::devices::boot_timer::BootTimer;
use crate::devices::bus::Bus;
use crate::devices::i8042::I8042;
use crate::devices::legacy::SerialDevice;
use crate::devices::EventFdTrigger;

/// Where the `index`th virtio-mmio device lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceSlot {
    pub base: u64,
    pub size: u64,
    pub irq: u32,
}

/// What kind of virtualization backs `/dev/kvm` on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostKind {
    /// Hardware virtualization: guest code runs natively.
    HardwareVirt,
    /// KVM's PVM module (pagetable-based virtualization): a guest kernel that is not
    /// PVM-enlightened runs inside KVM's instruction emulator.
    Pvm,
}

impl HostKind {
    /// Detects the host kind from the loaded KVM modules, or, where `/sys` is not mounted
    /// (inside a jail), from the CPU: KVM without hardware virtualization is PVM.
    pub fn detect() -> HostKind {
        if std::path::Path::new("/sys/module").is_dir() {
            if std::path::Path::new("/sys/module/kvm_pvm").exists() {
                HostKind::Pvm
            } else {
                HostKind::HardwareVirt
            }
        } else if cpu_has_hardware_virt() {
            HostKind::HardwareVirt
        } else {
            HostKind::Pvm
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            HostKind::HardwareVirt => "hardware virtualization",
            HostKind::Pvm => "PVM (guest kernel code runs in KVM's instruction emulator)",
        }
    }
}

/// Whether the CPU reports VT-x (CPUID.1:ECX.VMX) or AMD-V (CPUID.80000001h:ECX.SVM).
#[cfg(target_arch = "x86_64")]
fn cpu_has_hardware_virt() -> bool {
    use std::arch::x86_64::__cpuid;
    const VMX: u32 = 1 << 5;
    const SVM: u32 = 1 << 2;
    let vmx = __cpuid(1).ecx & VMX != 0;
    let svm = __cpuid(0x8000_0000).eax >= 0x8000_0001 && __cpuid(0x8000_0001).ecx & SVM != 0;
    vmx || svm
}

/// Other architectures have no PVM.
#[cfg(not(target_arch = "x86_64"))]
fn cpu_has_hardware_virt() -> bool {
    true
}

/// Why an architecture could not set something up.
#[derive(Debug, thiserror::Error)]
pub enum ArchError {
    /// The guest's input is unusable (kernel image, initrd, command line).
    #[error(transparent)]
    Input(Box<dyn std::error::Error + Send + Sync>),
    #[error("cannot {0}")]
    Kvm(String, #[source] kvm_ioctls::Error),
    #[error("cannot write boot structures into guest memory")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("device layout conflict")]
    Bus(#[source] crate::devices::bus::BusError),
    #[error("invalid serial state: {0}")]
    SerialState(String),
    #[error("invalid saved {0}")]
    SavedState(&'static str),
    #[error("this build of flick does not run guests on {0} yet")]
    Unsupported(&'static str),
}

impl ArchError {
    /// Whether the host rather than the request is at fault.
    pub fn is_internal(&self) -> bool {
        matches!(
            self,
            ArchError::Kvm(..) | ArchError::GuestMemory(_) | ArchError::EventFd(_)
        )
    }
}

/// A failed KVM call, naming what it was for.
pub fn kvm_error(what: &str) -> impl FnOnce(kvm_ioctls::Error) -> ArchError + '_ {
    move |e| ArchError::Kvm(what.to_string(), e)
}

/// What an architecture needs to prepare a guest for booting.
#[derive(Debug)]
pub struct GuestSetup<'a> {
    /// The VM, for what the architecture describes to the guest from KVM's capabilities
    /// (aarch64: whether vCPUs have a PMU).
    pub vm: &'a VmFd,
    pub mem: &'a GuestMemoryMmap,
    /// Guest RAM ranges `(start, size)`.
    pub ram: &'a [(u64, u64)],
    pub boot: &'a BootSourceConfig,
    /// The complete kernel command line.
    pub cmdline: &'a str,
    pub vcpu_count: u8,
    /// The virtio-mmio devices, for architectures that describe them to the guest (aarch64: the
    /// device tree).
    pub devices: &'a [DeviceSlot],
}

/// Legacy devices, created by the architecture and used by the VMM thread.
pub struct Legacy {
    pub serial: Arc<Mutex<SerialDevice>>,
    /// Signalled when the guest drains the serial receive FIFO.
    pub serial_drained: EventFd,
    /// Signalled when the guest resets the machine through a device (x86: the i8042).
    pub reset: EventFd,
    /// The keyboard controller for `SendCtrlAltDel`, where the architecture has one.
    pub i8042: Option<Arc<Mutex<I8042>>>,
    /// Raised when the guest resets the machine; the vCPUs stop running guest code.
    pub stopping: Arc<AtomicBool>,
}

impl std::fmt::Debug for Legacy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Legacy")
            .field("has_i8042", &self.i8042.is_some())
            .finish_non_exhaustive()
    }
}

/// Makes the serial device from its interrupt trigger and its drained trigger.
pub type MakeSerial<'a> =
    Box<dyn FnOnce(EventFdTrigger, EventFdTrigger) -> Result<SerialDevice, String> + 'a>;

/// What an architecture-specific exit asks of the vCPU loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArchExit {
    /// A port read (`true`) or write (`false`); `claimed` when a device owns the port.
    PortIo { read: bool, claimed: bool },
    /// The guest cannot continue; names what happened.
    Fault(String),
    /// Not an exit this architecture knows.
    Unknown,
}

/// Everything an architecture provides. Every method runs on the thread that calls it; none
/// keeps state between calls.
pub trait Arch {
    /// The architecture's name, for messages.
    const NAME: &'static str;
    /// What a vCPU was configured with and a snapshot must carry (x86: its CPUID).
    type VcpuConfig: Send + 'static;
    /// One vCPU's state in a snapshot.
    type VcpuState: Serialize + DeserializeOwned + std::fmt::Debug + Send + 'static;
    /// VM-wide KVM state in a snapshot (interrupt controllers, timers, clock).
    type VmState: Serialize + DeserializeOwned + std::fmt::Debug;
    /// What capturing vCPU state needs from the VM (x86: the MSRs to try).
    type SaveContext: Clone + Send + std::fmt::Debug + 'static;
    /// Where the boot vCPU starts.
    type BootEntry: std::fmt::Debug;
    /// Whether the guest learns of virtio-mmio devices from `virtio_mmio.device=` entries on its
    /// command line (x86) rather than from boot structures the architecture writes.
    const DEVICES_ON_CMDLINE: bool = true;
    /// Whether a snapshot's VM-wide state is restored after its vCPUs (aarch64: the GIC finds
    /// per-vCPU state by the MPIDR that initialising a vCPU sets) rather than right after the
    /// VM is created (x86: before devices can raise interrupts).
    const RESTORE_VM_AFTER_VCPUS: bool = false;

    /// Guest RAM ranges `(start, size)` for `mem_bytes` of memory.
    fn ram_ranges(mem_bytes: u64) -> Vec<(u64, u64)>;
    /// The `index`th virtio device's slot, or `None` when no interrupt line is left.
    fn device_slot(index: usize) -> Option<DeviceSlot>;
    /// `auto` resolved for this host.
    fn effective_profile(profile: CpuProfile, host: HostKind) -> CpuProfile;
    /// Kernel command line arguments this host needs for `profile`, before the device entries.
    fn host_cmdline(profile: CpuProfile, host: HostKind) -> Option<&'static str>;

    /// Creates the interrupt controller and timers; called after memory is registered, before
    /// any vCPU is created.
    fn setup_vm(vm: &VmFd) -> Result<(), ArchError>;
    /// Finishes the VM once its `vcpu_count` vCPUs exist, before any device or irqfd is set up
    /// (aarch64: the GIC, which KVM initialises only then).
    fn vcpus_created(_vm: &VmFd, _vcpu_count: u8) -> Result<(), ArchError> {
        Ok(())
    }
    /// Loads the kernel (and initrd) and writes the boot structures.
    fn load_guest(setup: &GuestSetup<'_>) -> Result<Self::BootEntry, ArchError>;
    /// What each vCPU of `machine` is configured with on this kind of host.
    fn vcpu_configs(
        kvm: &Kvm,
        vm: &VmFd,
        machine: &MachineConfig,
        profile: CpuProfile,
        host: HostKind,
    ) -> Result<Vec<Self::VcpuConfig>, ArchError>;
    /// Configures a new vCPU; the boot vCPU gets `entry`.
    fn configure_vcpu(
        fd: &VcpuFd,
        index: u8,
        config: &Self::VcpuConfig,
        entry: Option<&Self::BootEntry>,
    ) -> Result<(), ArchError>;
    /// Creates the legacy devices: the serial console (made by `make_serial`), a reset source,
    /// the boot timer. Puts them on `mmio` or on the returned port bus.
    fn legacy_devices(
        vm: &VmFd,
        mmio: &mut Bus,
        timer: BootTimer,
        make_serial: MakeSerial<'_>,
    ) -> Result<(Legacy, Bus), ArchError>;

    /// Handles an exit the generic vCPU loop does not know, with the port bus.
    fn handle_exit(exit: VcpuExit<'_>, pio: &Bus) -> ArchExit;
    /// Where a stopped vCPU is, for error messages (x86: RIP and the instruction bytes).
    fn stop_location(fd: &VcpuFd, mem: &GuestMemoryMmap) -> String;

    /// What [`Arch::save_vcpu`] needs, read once per snapshot.
    fn save_context(kvm: &Kvm) -> Result<Self::SaveContext, ArchError>;
    /// Captures a paused vCPU.
    fn save_vcpu(
        fd: &VcpuFd,
        config: &Self::VcpuConfig,
        context: &Self::SaveContext,
    ) -> Result<Self::VcpuState, ArchError>;
    /// Restores a saved vCPU into a new one; returns what it is configured with.
    fn restore_vcpu(fd: &VcpuFd, state: &Self::VcpuState) -> Result<Self::VcpuConfig, ArchError>;
    /// Captures VM-wide state.
    fn save_vm(vm: &VmFd) -> Result<Self::VmState, ArchError>;
    /// Restores VM-wide state into a VM set up by [`Arch::setup_vm`].
    fn restore_vm(vm: &VmFd, state: &Self::VmState) -> Result<(), ArchError>;
}
