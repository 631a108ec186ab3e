//! Turns a validated [`VmConfig`] into a running VM: guest memory, KVM VM, kernel and boot
//! structures, legacy devices on the buses, and one thread per vCPU.

use std::sync::{mpsc, Arc, Mutex};
use std::time::Instant;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::attach::{self, AttachError, Attached};
use crate::arch::current::layout::{
    self, BOOT_TIMER_START, EBDA_START, MMIO_SLOT_SIZE, PVH_INFO_START, PVH_MEMMAP_START,
    PVH_MODLIST_START, SERIAL_IRQ, SERIAL_PORT, ZERO_PAGE_START,
};
use crate::arch::current::regs::{self, EntryMode};
use crate::arch::current::{cpuid, mptable, zeropage};
use crate::boot::{self, BootError};
use crate::config::{CpuProfile, HugePages, VmConfig, DEFAULT_BOOT_ARGS};
use crate::devices::boot_timer::{BootTimer, BootTimes};
use crate::devices::bus::Bus;
use crate::devices::i8042::I8042;
use crate::devices::legacy::{SerialDevice, SerialOut};
use crate::devices::EventFdTrigger;
use crate::kvm::vcpu::{self, Vcpu, VcpuError, VcpuEvent, VcpuSetup, VcpuStats};
use crate::kvm::vm::{Vm, VmError};
use crate::kvm::HostKind;

/// Legacy port the older Firecracker guest images write the boot-timer byte to.
const LEGACY_BOOT_TIMER_PORT: u64 = 0x3f0;
const I8042_PORT: u64 = 0x60;
const I8042_PORT_LEN: u64 = 5;
const KEYBOARD_IRQ: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("no boot source: configure boot-source (kernel_image_path) before InstanceStart")]
    NoBootSource,
    #[error("{0} is not supported by this build of flick yet")]
    Unsupported(&'static str),
    #[error("invalid serial state: {0}")]
    SerialState(String),
    #[error("mem_size_mib {requested} exceeds the host's memory ({host} MiB)")]
    MemoryTooLarge { requested: usize, host: u64 },
    #[error("cannot allocate {0} MiB of guest memory")]
    Memory(usize, #[source] vm_memory::mmap::FromRangesError),
    #[error(transparent)]
    Kvm(#[from] VmError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("cannot write boot structures into guest memory")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("device layout conflict")]
    Bus(#[source] crate::devices::bus::BusError),
    #[error(transparent)]
    Attach(#[from] AttachError),
}

/// Inputs of a build besides the config.
pub struct BuildContext {
    pub host: HostKind,
    pub serial_out: SerialOut,
    pub boot_timer_log: bool,
    pub started: Instant,
    pub started_cpu_us: u64,
    pub boot_times: Arc<BootTimes>,
}

/// A VM whose vCPUs are running.
pub struct RunningVm {
    pub vm: Vm,
    pub mem: GuestMemoryMmap,
    /// Guest RAM ranges `(start, size)`.
    pub ram: Vec<(u64, u64)>,
    /// Serial, i8042 and the eventfds the VMM thread watches for them.
    pub legacy: Legacy,
    /// The vCPU threads and what reports from them.
    pub vcpus: Vcpus,
    pub cpu_profile: CpuProfile,
    pub devices: Attached,
}

impl std::fmt::Debug for RunningVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningVm")
            .field("vcpus", &self.vcpus.handles.len())
            .finish()
    }
}

pub(crate) fn eventfd() -> Result<EventFd, BuildError> {
    EventFd::new(EFD_NONBLOCK).map_err(BuildError::EventFd)
}

fn host_memory_mib() -> u64 {
    // SAFETY: sysconf only reads system constants.
    let pages = unsafe { libc::sysconf(libc::_SC_PHYS_PAGES) };
    // SAFETY: as above.
    let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    (pages.max(0) as u64 * page_size.max(0) as u64) >> 20
}

/// Times the build's phases for the debug log.
pub(crate) struct Phases(Instant);

impl Phases {
    pub(crate) fn new() -> Self {
        Phases(Instant::now())
    }

    pub(crate) fn mark(&mut self, what: &str) {
        let now = Instant::now();
        tracing::debug!("build phase: {what}: {} us", (now - self.0).as_micros());
        self.0 = now;
    }
}

/// On PVM hosts the guest kernel's CPUID instructions are not intercepted, so a CPUID profile
/// alone cannot hide features the instruction emulator lacks; Linux guests are told on their
/// command line instead (measured: without these a 6.1 guest stops on `xrstor` at FPU init).
pub const PVM_FEATURE_ARGS: &str = "clearcpuid=xsave,xsaveopt,xsavec,xsaves,smap,smep,popcnt,\
rdrand,rdseed,fsgsbase,avx,avx2,bmi1,bmi2,movbe,pcid,invpcid,rdpid,umip,pku,ospke";

/// Resolves `auto` for this host.
pub fn effective_profile(profile: CpuProfile, host: HostKind) -> CpuProfile {
    match (profile, host) {
        (CpuProfile::Auto, HostKind::Pvm) => CpuProfile::Conservative,
        (CpuProfile::Auto, HostKind::HardwareVirt) => CpuProfile::Host,
        (other, _) => other,
    }
}

/// The kernel command line: the user's (or the default) arguments, then the device entries.
pub fn kernel_cmdline(config: &VmConfig, devices: &[String]) -> String {
    let boot = config.boot_source.as_ref();
    let mut cmdline = boot
        .and_then(|b| b.boot_args.clone())
        .unwrap_or_else(|| DEFAULT_BOOT_ARGS.to_string());
    for entry in devices {
        if !cmdline.is_empty() {
            cmdline.push(' ');
        }
        cmdline.push_str(entry);
    }
    cmdline
}

fn check_supported(config: &VmConfig) -> Result<(), BuildError> {
    if config.vsock.is_some() {
        return Err(BuildError::Unsupported("vsock"));
    }
    if config.balloon.is_some() || config.entropy.is_some() {
        return Err(BuildError::Unsupported("balloon and entropy devices"));
    }
    if config.machine_config.huge_pages != HugePages::None {
        return Err(BuildError::Unsupported("huge_pages"));
    }
    Ok(())
}

/// Writes the boot structures for `kernel` into guest memory.
fn write_boot_info(
    mem: &GuestMemoryMmap,
    kernel: &boot::LoadedKernel,
    info: &zeropage::BootInfo,
    ram: &[(u64, u64)],
    vcpus: u8,
) -> Result<(), BuildError> {
    let map = zeropage::memory_map(ram);
    let write = |bytes: &[u8], addr: u64| {
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(BuildError::GuestMemory)
    };
    write(&mptable::build(vcpus, EBDA_START), EBDA_START)?;
    match kernel.mode {
        EntryMode::Linux64 => {
            let params = zeropage::linux_boot_params(kernel.setup_header, info, &map);
            mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
                .map_err(BuildError::GuestMemory)?;
        }
        EntryMode::Pvh => {
            let blobs = zeropage::pvh_start_info(info, &map, PVH_MODLIST_START, PVH_MEMMAP_START);
            write(&blobs.start_info, PVH_INFO_START)?;
            write(&blobs.modlist, PVH_MODLIST_START)?;
            write(&blobs.memmap, PVH_MEMMAP_START)?;
        }
    }
    regs::write_boot_tables(mem, kernel.mode).map_err(BuildError::GuestMemory)
}

/// Creates the KVM VM around `mem`: memory slots first, then irqchip and PIT.
pub(crate) fn create_vm(
    mem: &GuestMemoryMmap,
    vcpus: u8,
    phases: &mut Phases,
) -> Result<Vm, BuildError> {
    let vm = Vm::new()?;
    phases.mark("create VM");
    vm.check_vcpu_count(vcpus)?;
    vm.register_memory(mem)?;
    phases.mark("register memory");
    vm.create_irqchip()?;
    phases.mark("irqchip and PIT");
    Ok(vm)
}

/// Legacy devices on their buses.
pub struct Legacy {
    pub serial: Arc<Mutex<SerialDevice>>,
    /// Signalled when the guest drains the serial receive FIFO.
    pub serial_drained: EventFd,
    /// Signalled by the i8042 when the guest requests a reset.
    pub reset: EventFd,
    /// The keyboard controller, for `SendCtrlAltDel`.
    pub i8042: Arc<Mutex<I8042>>,
    /// Raised when the guest resets the machine; the vCPUs stop running guest code.
    pub stopping: Arc<std::sync::atomic::AtomicBool>,
}

/// Creates serial (through `make_serial(interrupt, drained)`), i8042 and boot timer; returns them
/// with the port bus they are on (the boot timer also goes on `mmio`).
pub(crate) fn legacy_devices(
    vm: &Vm,
    mmio: &mut Bus,
    timer: BootTimer,
    make_serial: impl FnOnce(EventFdTrigger, EventFdTrigger) -> Result<SerialDevice, BuildError>,
) -> Result<(Legacy, Bus), BuildError> {
    let serial_irq = eventfd()?;
    vm.register_irqfd(&serial_irq, SERIAL_IRQ)?;
    let serial_drained = eventfd()?;
    let drained = EventFdTrigger(serial_drained.try_clone().map_err(BuildError::EventFd)?);
    let serial = Arc::new(Mutex::new(make_serial(
        EventFdTrigger(serial_irq),
        drained,
    )?));
    let reset = eventfd()?;
    let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let keyboard_irq = eventfd()?;
    vm.register_irqfd(&keyboard_irq, KEYBOARD_IRQ)?;
    let i8042 = Arc::new(Mutex::new(I8042::new(
        EventFdTrigger(reset.try_clone().map_err(BuildError::EventFd)?),
        EventFdTrigger(keyboard_irq),
        stopping.clone(),
    )));
    let timer = Arc::new(Mutex::new(timer));
    let mut pio = Bus::new();
    pio.insert(serial.clone(), u64::from(SERIAL_PORT), 8)
        .map_err(BuildError::Bus)?;
    pio.insert(i8042.clone(), I8042_PORT, I8042_PORT_LEN)
        .map_err(BuildError::Bus)?;
    pio.insert(timer.clone(), LEGACY_BOOT_TIMER_PORT, 1)
        .map_err(BuildError::Bus)?;
    mmio.insert(timer, BOOT_TIMER_START, MMIO_SLOT_SIZE)
        .map_err(BuildError::Bus)?;
    let legacy = Legacy {
        serial,
        serial_drained,
        reset,
        i8042,
        stopping,
    };
    Ok((legacy, pio))
}

/// Running vCPU threads and what the VMM needs to watch them.
pub struct Vcpus {
    pub handles: Vec<vcpu::VcpuHandle>,
    pub stats: Vec<Arc<VcpuStats>>,
    /// Why a vCPU stopped; signalled on `wake`.
    pub events: mpsc::Receiver<VcpuEvent>,
    pub wake: EventFd,
}

/// Starts one thread per configured vCPU (`(fd, cpuid)` in index order).
pub(crate) fn start_vcpus(
    configured: Vec<(kvm_ioctls::VcpuFd, kvm_bindings::CpuId)>,
    mem: &GuestMemoryMmap,
    pio: Bus,
    mmio: Bus,
    start_paused: bool,
    stopping: &Arc<std::sync::atomic::AtomicBool>,
) -> Result<Vcpus, BuildError> {
    let (pio, mmio) = (Arc::new(pio), Arc::new(mmio));
    let (events_tx, events) = mpsc::channel();
    let wake = eventfd()?;
    let mut stats = Vec::new();
    let mut handles = Vec::new();
    for (index, (fd, cpuid)) in configured.into_iter().enumerate() {
        let vcpu_stats = Arc::new(VcpuStats::default());
        stats.push(vcpu_stats.clone());
        let vcpu = Vcpu {
            fd,
            index: index as u8,
            cpuid,
            start_paused,
            stopping: stopping.clone(),
            pio: pio.clone(),
            mmio: mmio.clone(),
            mem: mem.clone(),
            stats: vcpu_stats,
            events: events_tx.clone(),
            wake: wake.try_clone().map_err(BuildError::EventFd)?,
        };
        handles.push(vcpu.spawn()?);
    }
    Ok(Vcpus {
        handles,
        stats,
        events,
        wake,
    })
}

/// Checks the memory size against the host.
pub(crate) fn check_memory(mem_size_mib: usize) -> Result<(), BuildError> {
    let host_mib = host_memory_mib();
    if mem_size_mib as u64 > host_mib {
        return Err(BuildError::MemoryTooLarge {
            requested: mem_size_mib,
            host: host_mib,
        });
    }
    Ok(())
}

/// Builds the VM described by `config` and starts its vCPUs.
pub fn build(config: &VmConfig, ctx: BuildContext) -> Result<RunningVm, BuildError> {
    let boot_source = config
        .boot_source
        .as_ref()
        .ok_or(BuildError::NoBootSource)?;
    check_supported(config)?;
    let machine = &config.machine_config;
    check_memory(machine.mem_size_mib)?;
    let drives = attach::open_drives(&config.drives)?;
    let nets = attach::open_nets(&config.network_interfaces, &[])?;
    let ram = layout::ram_ranges((machine.mem_size_mib as u64) << 20);
    let ranges: Vec<_> = ram
        .iter()
        .map(|&(s, l)| (GuestAddress(s), l as usize))
        .collect();
    let mem = GuestMemoryMmap::from_ranges(&ranges)
        .map_err(|e| BuildError::Memory(machine.mem_size_mib, e))?;

    let mut phases = Phases::new();
    let vm = create_vm(&mem, machine.vcpu_count, &mut phases)?;

    let kernel = boot::load_kernel(&mem, &boot_source.kernel_image_path)?;
    let low_ram_end = ram[0].1;
    let initrd = match &boot_source.initrd_path {
        Some(path) => Some(boot::load_initrd(&mem, path, kernel.end, low_ram_end)?),
        None => None,
    };
    let mut mmio = Bus::new();
    let mut devices = Attached::default();
    attach::attach_drives(&vm, &mem, &mut mmio, &mut devices, drives)?;
    attach::attach_nets(&vm, &mem, &mut mmio, &mut devices, nets)?;
    let profile = effective_profile(machine.cpu_profile, ctx.host);
    let mut extra = Vec::new();
    if profile == CpuProfile::Conservative && ctx.host == HostKind::Pvm {
        extra.push(PVM_FEATURE_ARGS.to_string());
    }
    extra.append(&mut devices.cmdline);
    let cmdline = kernel_cmdline(config, &extra);
    boot::write_cmdline(&mem, &cmdline)?;
    let info = zeropage::BootInfo {
        cmdline_addr: layout::CMDLINE_START,
        cmdline_len: cmdline.len(),
        initrd,
    };
    write_boot_info(&mem, &kernel, &info, &ram, machine.vcpu_count)?;
    phases.mark("load kernel, initrd, boot structures");

    let timer = BootTimer::new(
        ctx.started,
        ctx.started_cpu_us,
        ctx.boot_times.clone(),
        ctx.boot_timer_log,
    );
    let serial_out = ctx.serial_out;
    let (legacy, pio) = legacy_devices(&vm, &mut mmio, timer, |irq, drained| {
        Ok(SerialDevice::new(irq, drained, serial_out))
    })?;
    phases.mark("devices");

    let mut supported = vm.supported_cpuid()?;
    if ctx.host == HostKind::Pvm {
        cpuid::hide_pv_hypercalls(supported.as_mut_slice());
    }
    phases.mark("supported CPUID");
    let topo = cpuid::Topology {
        vcpu_count: machine.vcpu_count,
        threads_per_core: if machine.smt { 2 } else { 1 },
    };
    let mut configured = Vec::new();
    for index in 0..machine.vcpu_count {
        let fd = vm.create_vcpu(index)?;
        let setup = VcpuSetup {
            index,
            cpuid: cpuid::for_vcpu(&supported, index, topo, profile),
            entry: (index == 0).then_some((kernel.mode, kernel.entry)),
        };
        vcpu::configure(&fd, &setup)?;
        configured.push((fd, setup.cpuid));
    }
    phases.mark("create and configure vCPUs");
    let vcpus = start_vcpus(configured, &mem, pio, mmio, false, &legacy.stopping)?;
    phases.mark("spawn vCPU threads");
    Ok(RunningVm {
        vm,
        mem,
        ram,
        legacy,
        vcpus,
        cpu_profile: profile,
        devices,
    })
}
