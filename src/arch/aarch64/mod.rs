//! aarch64: the memory map (Firecracker's arm64 layout), loading a kernel `Image` and an initrd,
//! the device tree, the in-kernel GICv3, vCPU initialisation (PSCI 0.2) and boot registers, and
//! the 8250 UART, PL031 RTC and boot timer on MMIO. PSCI SYSTEM_OFF and SYSTEM_RESET reach the
//! generic vCPU loop as system events. vCPU and GICv3 state for snapshots (`state.rs`).

pub mod fdt;
pub mod gic;
pub mod layout;
pub mod state;
pub mod vcpu;

use std::fs::File;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use crate::memory::GuestMemoryMmap;
use kvm_bindings::kvm_vcpu_init;
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use linux_loader::loader::{pe::PE, KernelLoader};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{
    kvm_error, Arch, ArchError, ArchExit, DeviceSlot, GuestSetup, HostKind, Legacy, MakeSerial,
};
use crate::config::{CpuProfile, MachineConfig};
use crate::devices::boot_timer::BootTimer;
use crate::devices::bus::Bus;
use crate::devices::rtc::RtcDevice;
use crate::devices::EventFdTrigger;
use layout::{BOOT_TIMER_START, MMIO_SLOT_SIZE, RTC_START, SERIAL_SPI, SERIAL_START};

/// The aarch64 architecture.
#[derive(Debug)]
pub struct Aarch64;

/// Where the boot vCPU starts and where its device tree is.
#[derive(Debug, Clone, Copy)]
pub struct BootEntry {
    pub entry: u64,
    pub fdt: u64,
}

/// What saving a vCPU needs from the VM: nothing on aarch64.
#[derive(Debug, Clone)]
pub struct NoContext;

/// Why a guest's kernel, initrd or device tree cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot open the kernel image {0}")]
    OpenKernel(String, #[source] std::io::Error),
    #[error("the kernel is not an arm64 Image")]
    Kernel(#[source] linux_loader::loader::Error),
    #[error("cannot read the initrd {0}")]
    Initrd(String, #[source] std::io::Error),
    #[error("cannot copy the initrd into guest memory")]
    InitrdCopy(#[source] vm_memory::GuestMemoryError),
    #[error("guest memory is too small for the kernel, initrd and device tree")]
    TooSmall,
    #[error("cannot build the device tree")]
    Fdt(#[source] vm_fdt::Error),
}

fn input(e: LoadError) -> ArchError {
    ArchError::Input(Box::new(e))
}

fn eventfd() -> Result<EventFd, ArchError> {
    EventFd::new(EFD_NONBLOCK).map_err(ArchError::EventFd)
}

/// 32 bytes from the host's random number generator for `/chosen/rng-seed`; zeros (and a
/// warning) when it cannot be read.
fn rng_seed() -> [u8; 32] {
    let mut seed = [0u8; 32];
    // SAFETY: the buffer is valid and writable for its whole length.
    let n = unsafe { libc::getrandom(seed.as_mut_ptr().cast(), seed.len(), 0) };
    if usize::try_from(n).ok() != Some(seed.len()) {
        tracing::warn!("cannot read random bytes for the guest's rng-seed");
        seed = [0; 32];
    }
    seed
}

/// Copies the initrd at `path` to the highest page-aligned place below `limit` and above `floor`.
fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &str,
    floor: u64,
    limit: u64,
) -> Result<(u64, u64), LoadError> {
    let mut file = File::open(path).map_err(|e| LoadError::Initrd(path.into(), e))?;
    let size = file
        .metadata()
        .map_err(|e| LoadError::Initrd(path.into(), e))?
        .len();
    let start = limit.checked_sub(size).ok_or(LoadError::TooSmall)? & !0xfff;
    if start < floor {
        return Err(LoadError::TooSmall);
    }
    let len = usize::try_from(size).map_err(|_| LoadError::TooSmall)?;
    mem.read_exact_volatile_from(GuestAddress(start), &mut file, len)
        .map_err(LoadError::InitrdCopy)?;
    Ok((start, size))
}

impl Arch for Aarch64 {
    const NAME: &'static str = "aarch64";
    /// The device tree describes the virtio devices.
    const DEVICES_ON_CMDLINE: bool = false;
    const RESTORE_VM_AFTER_VCPUS: bool = true;
    type VcpuConfig = kvm_vcpu_init;
    type VcpuState = state::VcpuState;
    type VmState = state::GicState;
    type SaveContext = NoContext;
    type BootEntry = BootEntry;

    fn ram_ranges(mem_bytes: u64) -> Vec<(u64, u64)> {
        layout::ram_ranges(mem_bytes)
    }

    fn device_slot(index: usize) -> Option<DeviceSlot> {
        layout::device_slot(index)
    }

    /// CPU profiles shape x86 CPUID; aarch64 guests see the host's preferred vCPU target.
    fn effective_profile(profile: CpuProfile, _: HostKind) -> CpuProfile {
        match profile {
            CpuProfile::Auto => CpuProfile::Host,
            other => other,
        }
    }

    fn host_cmdline(_: CpuProfile, _: HostKind) -> Option<&'static str> {
        None
    }

    /// Nothing before the vCPUs exist: KVM refuses new vCPUs once the GIC is initialised.
    fn setup_vm(_: &VmFd) -> Result<(), ArchError> {
        Ok(())
    }

    fn vcpus_created(vm: &VmFd, vcpu_count: u8) -> Result<(), ArchError> {
        gic::create(vm, vcpu_count)
    }

    fn load_guest(setup: &GuestSetup<'_>) -> Result<BootEntry, ArchError> {
        let mem = setup.mem;
        let path = &setup.boot.kernel_image_path;
        let mut kernel =
            File::open(path).map_err(|e| input(LoadError::OpenKernel(path.clone(), e)))?;
        let loaded = PE::load(
            mem,
            Some(GuestAddress(layout::KERNEL_START)),
            &mut kernel,
            None,
        )
        .map_err(|e| input(LoadError::Kernel(e)))?;
        let (ram_start, ram_size) = setup.ram[0];
        let fdt_addr = layout::fdt_start(ram_start + ram_size);
        if loaded.kernel_end > fdt_addr || fdt_addr < ram_start {
            return Err(input(LoadError::TooSmall));
        }
        let initrd = match &setup.boot.initrd_path {
            Some(initrd) => {
                Some(load_initrd(mem, initrd, loaded.kernel_end, fdt_addr).map_err(input)?)
            }
            None => None,
        };
        let blob = fdt::build(&fdt::FdtConfig {
            ram: setup.ram,
            vcpus: setup.vcpu_count,
            cmdline: setup.cmdline,
            initrd,
            devices: setup.devices,
            rng_seed: rng_seed(),
            pmu: vcpu::pmu_available(setup.vm),
            its: gic::has_its(setup.vm),
        })
        .map_err(|e| input(LoadError::Fdt(e)))?;
        if blob.len() as u64 > layout::FDT_MAX_SIZE {
            return Err(input(LoadError::TooSmall));
        }
        mem.write_slice(&blob, GuestAddress(fdt_addr))
            .map_err(ArchError::GuestMemory)?;
        Ok(BootEntry {
            entry: loaded.kernel_load.0,
            fdt: fdt_addr,
        })
    }

    fn vcpu_configs(
        _: &Kvm,
        vm: &VmFd,
        machine: &MachineConfig,
        _: CpuProfile,
        _: HostKind,
    ) -> Result<Vec<kvm_vcpu_init>, ArchError> {
        let init = vcpu::preferred_init(vm)?;
        Ok(vec![init; usize::from(machine.vcpu_count)])
    }

    fn configure_vcpu(
        fd: &VcpuFd,
        index: u8,
        init: &kvm_vcpu_init,
        entry: Option<&BootEntry>,
    ) -> Result<(), ArchError> {
        vcpu::init(fd, index, init)?;
        if let Some(entry) = entry {
            vcpu::set_boot_regs(fd, entry.entry, entry.fdt)?;
        }
        Ok(())
    }

    /// The 8250 UART, the PL031 RTC and the boot timer, all on MMIO; no port bus.
    fn legacy_devices(
        vm: &VmFd,
        mmio: &mut Bus,
        timer: BootTimer,
        make_serial: MakeSerial<'_>,
    ) -> Result<(Legacy, Bus), ArchError> {
        let serial_irq = eventfd()?;
        vm.register_irqfd(&serial_irq, SERIAL_SPI)
            .map_err(kvm_error("set up the VM's irqfd"))?;
        let serial_drained = eventfd()?;
        let drained = EventFdTrigger(serial_drained.try_clone().map_err(ArchError::EventFd)?);
        let serial =
            make_serial(EventFdTrigger(serial_irq), drained).map_err(ArchError::SerialState)?;
        let serial = Arc::new(Mutex::new(serial));
        mmio.insert(serial.clone(), SERIAL_START, MMIO_SLOT_SIZE)
            .map_err(ArchError::Bus)?;
        mmio.insert(
            Arc::new(Mutex::new(RtcDevice::new())),
            RTC_START,
            MMIO_SLOT_SIZE,
        )
        .map_err(ArchError::Bus)?;
        mmio.insert(
            Arc::new(Mutex::new(timer)),
            BOOT_TIMER_START,
            MMIO_SLOT_SIZE,
        )
        .map_err(ArchError::Bus)?;
        let legacy = Legacy {
            serial,
            serial_drained,
            // PSCI SYSTEM_RESET reaches the vCPU loop as a system event; no device resets.
            reset: eventfd()?,
            i8042: None,
            stopping: Arc::new(AtomicBool::new(false)),
        };
        Ok((legacy, Bus::new()))
    }

    fn handle_exit(_: VcpuExit<'_>, _: &Bus) -> ArchExit {
        ArchExit::Unknown
    }

    fn stop_location(fd: &VcpuFd, _: &GuestMemoryMmap) -> String {
        vcpu::pc(fd).map_or_else(String::new, |pc| format!(" at PC {pc:#x}"))
    }

    fn save_context(_: &Kvm) -> Result<NoContext, ArchError> {
        Ok(NoContext)
    }

    fn save_vcpu(
        fd: &VcpuFd,
        init: &kvm_vcpu_init,
        _: &NoContext,
    ) -> Result<state::VcpuState, ArchError> {
        state::VcpuState::capture(fd, init)
    }

    fn restore_vcpu(fd: &VcpuFd, saved: &state::VcpuState) -> Result<kvm_vcpu_init, ArchError> {
        saved.restore(fd)
    }

    /// The GIC (restored after the vCPUs: `RESTORE_VM_AFTER_VCPUS`).
    fn save_vm(vm: &VmFd) -> Result<state::GicState, ArchError> {
        gic::with_gic(vm, state::GicState::capture)
    }

    fn restore_vm(vm: &VmFd, saved: &state::GicState) -> Result<(), ArchError> {
        gic::with_gic(vm, |gic| saved.restore(gic))
    }
}
