//! Turns a validated [`VmConfig`] into a running VM: guest memory, KVM VM, devices from the
//! registry, the guest's kernel and boot structures (by the architecture), legacy devices on the
//! buses, and one thread per vCPU. Snapshot loading ([`super::snapshot`]) reuses the steps.

use std::sync::atomic::AtomicBool;
use std::sync::{mpsc, Arc};
use std::time::Instant;

use crate::memory::GuestMemoryMmap;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::registry::{Opened, Registry, RegistryError};
use crate::arch::{Arch, ArchError, Current, GuestSetup, HostKind, Legacy};
use crate::config::{CpuProfile, HugePages, VmConfig, DEFAULT_BOOT_ARGS};
use crate::devices::boot_timer::{BootTimer, BootTimes};
use crate::devices::bus::Bus;
use crate::devices::legacy::SerialOut;
use crate::devices::virtio::{DeviceError, Overrides};
use crate::kvm::vcpu::{self, Vcpu, VcpuError, VcpuEvent, VcpuStats};
use crate::kvm::vm::{Vm, VmError};

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("no boot source: configure boot-source (kernel_image_path) before InstanceStart")]
    NoBootSource,
    #[error("mem_size_mib {requested} exceeds the host's memory ({host} MiB)")]
    MemoryTooLarge { requested: usize, host: u64 },
    #[error("cannot allocate {0} MiB of guest memory")]
    Memory(usize, #[source] vm_memory::mmap::FromRangesError),
    #[error(transparent)]
    Kvm(#[from] VmError),
    #[error(transparent)]
    Arch(#[from] ArchError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    #[error(transparent)]
    Devices(#[from] RegistryError),
}

impl From<DeviceError> for BuildError {
    fn from(e: DeviceError) -> Self {
        BuildError::Devices(e.into())
    }
}

impl BuildError {
    /// Whether the host rather than the request is at fault.
    pub fn is_internal(&self) -> bool {
        match self {
            BuildError::Kvm(VmError::TooManyVcpus { .. }) => false,
            BuildError::Kvm(_) | BuildError::Vcpu(_) | BuildError::EventFd(_) => true,
            BuildError::Arch(e) => e.is_internal(),
            BuildError::Devices(e) => e.is_internal(),
            _ => false,
        }
    }
}

/// Inputs of a build besides the config.
pub struct BuildContext {
    pub host: HostKind,
    pub serial_out: SerialOut,
    pub boot_timer_log: bool,
    pub started: Instant,
    pub started_cpu_us: u64,
    pub boot_times: Arc<BootTimes>,
    /// The seccomp filter each vCPU thread installs as it starts.
    pub vcpu_seccomp: Option<crate::seccomp::Filter>,
    /// The MMDS store the interfaces with MMDS answer from.
    pub mmds: crate::mmds::SharedMmds,
}

impl std::fmt::Debug for BuildContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BuildContext")
            .field("host", &self.host)
            .field("boot_timer_log", &self.boot_timer_log)
            .finish_non_exhaustive()
    }
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
    /// Every virtio device.
    pub devices: Registry,
    /// KVM logs the guest's writes to memory (`track_dirty_pages`): diff snapshots are possible.
    pub track_dirty: bool,
    /// A UFFD page server provides guest memory (a snapshot loaded with the `Uffd` backend).
    pub uffd: Option<super::uffd::UffdBackend>,
}

impl std::fmt::Debug for RunningVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningVm")
            .field("vcpus", &self.vcpus.handles.len())
            .finish()
    }
}

fn eventfd() -> Result<EventFd, BuildError> {
    EventFd::new(EFD_NONBLOCK).map_err(BuildError::EventFd)
}

fn host_memory_mib() -> u64 {
    // SAFETY: sysconf only reads system constants.
    let pages = unsafe { libc::sysconf(libc::_SC_PHYS_PAGES) };
    // SAFETY: as above.
    let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    let positive = |n: libc::c_long| u64::try_from(n).unwrap_or(0);
    (positive(pages) * positive(page_size)) >> 20
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

/// The kernel command line: the user's (or the default) arguments, then the extra entries.
pub fn kernel_cmdline(config: &VmConfig, extra: &[String]) -> String {
    let boot = config.boot_source.as_ref();
    let mut cmdline = boot
        .and_then(|b| b.boot_args.clone())
        .unwrap_or_else(|| DEFAULT_BOOT_ARGS.to_string());
    for entry in extra {
        if !cmdline.is_empty() {
            cmdline.push(' ');
        }
        cmdline.push_str(entry);
    }
    cmdline
}

/// Creates the KVM VM around `mem` and its `vcpus` vCPUs (not yet configured): memory slots
/// first, then the architecture's irqchip, the vCPUs, and what the architecture finishes once
/// they exist.
pub(crate) fn create_vm(
    mem: &GuestMemoryMmap,
    vcpus: u8,
    track_dirty: bool,
    phases: &mut Phases,
) -> Result<(Vm, Vec<kvm_ioctls::VcpuFd>), BuildError> {
    let vm = Vm::new()?;
    phases.mark("create VM");
    vm.check_vcpu_count(vcpus)?;
    vm.register_memory(mem, track_dirty)?;
    phases.mark("register memory");
    Current::setup_vm(vm.fd())?;
    phases.mark("irqchip");
    let fds = (0..vcpus)
        .map(|index| vm.create_vcpu(index))
        .collect::<Result<Vec<_>, _>>()?;
    Current::vcpus_created(vm.fd(), vcpus)?;
    phases.mark("create vCPUs");
    Ok((vm, fds))
}

/// Running vCPU threads and what the VMM needs to watch them.
pub struct Vcpus {
    pub handles: Vec<vcpu::VcpuHandle>,
    pub stats: Vec<Arc<VcpuStats>>,
    /// Why a vCPU stopped; signalled on `wake`.
    pub events: mpsc::Receiver<VcpuEvent>,
    pub wake: EventFd,
}

impl std::fmt::Debug for Vcpus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vcpus")
            .field("count", &self.handles.len())
            .finish_non_exhaustive()
    }
}

/// Starts one thread per configured vCPU (`(fd, config)` in index order).
pub(crate) fn start_vcpus(
    configured: Vec<(kvm_ioctls::VcpuFd, <Current as Arch>::VcpuConfig)>,
    mem: &GuestMemoryMmap,
    buses: (Bus, Bus),
    start_paused: bool,
    stopping: &Arc<AtomicBool>,
    seccomp: Option<&crate::seccomp::Filter>,
) -> Result<Vcpus, BuildError> {
    let (pio, mmio) = (Arc::new(buses.0), Arc::new(buses.1));
    let (events_tx, events) = mpsc::channel();
    let wake = eventfd()?;
    let mut stats = Vec::new();
    let mut handles = Vec::new();
    for (index, (fd, config)) in (0u8..).zip(configured) {
        let vcpu_stats = Arc::new(VcpuStats::default());
        stats.push(vcpu_stats.clone());
        let vcpu = Vcpu {
            fd,
            index,
            config,
            start_paused,
            stopping: stopping.clone(),
            pio: pio.clone(),
            mmio: mmio.clone(),
            mem: mem.clone(),
            stats: vcpu_stats,
            events: events_tx.clone(),
            wake: wake.try_clone().map_err(BuildError::EventFd)?,
            seccomp: seccomp.cloned(),
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
    if u64::try_from(mem_size_mib).unwrap_or(u64::MAX) > host_mib {
        return Err(BuildError::MemoryTooLarge {
            requested: mem_size_mib,
            host: host_mib,
        });
    }
    Ok(())
}

/// Anonymous guest memory for `ram`.
pub(crate) fn guest_memory(
    ram: &[(u64, u64)],
    mem_size_mib: usize,
) -> Result<GuestMemoryMmap, BuildError> {
    let ranges: Vec<_> = ram
        .iter()
        .map(|&(s, l)| (GuestAddress(s), usize::try_from(l).unwrap_or(usize::MAX)))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).map_err(|e| BuildError::Memory(mem_size_mib, e))
}

/// Marks guest RAM for transparent huge pages (`huge_pages: Transparent`). The kernel may still
/// use small pages (THP disabled, fragmentation); a refusal is logged, the VM runs either way.
fn advise_huge_pages(mem: &GuestMemoryMmap) {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    for region in mem.iter() {
        let len = usize::try_from(region.len()).unwrap_or(0);
        // SAFETY: the range is one whole mapping owned by `mem`; MADV_HUGEPAGE only changes how
        // the kernel backs it and never its contents.
        let rc = unsafe { libc::madvise(region.as_ptr().cast(), len, libc::MADV_HUGEPAGE) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            tracing::warn!("huge_pages Transparent: madvise(MADV_HUGEPAGE) refused: {e}");
        }
    }
}

/// Builds the VM described by `config` and starts its vCPUs.
pub fn build(config: &VmConfig, ctx: BuildContext) -> Result<RunningVm, BuildError> {
    let boot_source = config
        .boot_source
        .as_ref()
        .ok_or(BuildError::NoBootSource)?;
    let machine = &config.machine_config;
    check_memory(machine.mem_size_mib)?;
    let overrides = Overrides {
        mmds: Some(&ctx.mmds),
        ..Overrides::default()
    };
    let opened = Opened::from_config(config, overrides)?;
    let mem_bytes = u64::try_from(machine.mem_size_mib).unwrap_or(u64::MAX) << 20;
    let ram = Current::ram_ranges(mem_bytes);
    let mem = guest_memory(&ram, machine.mem_size_mib)?;
    if machine.huge_pages == HugePages::Transparent {
        advise_huge_pages(&mem);
    }

    let mut phases = Phases::new();
    let (vm, vcpu_fds) = create_vm(
        &mem,
        machine.vcpu_count,
        machine.track_dirty_pages,
        &mut phases,
    )?;
    let mut mmio = Bus::new();
    let devices = Registry::attach(&vm, &mem, &mut mmio, opened)?;
    let slots: Vec<_> = (0..devices.entries.len())
        .filter_map(Current::device_slot)
        .collect();
    let profile = Current::effective_profile(machine.cpu_profile, ctx.host);
    let mut extra: Vec<String> = Current::host_cmdline(profile, ctx.host)
        .map(str::to_string)
        .into_iter()
        .collect();
    extra.extend(devices.cmdline.iter().cloned());
    let cmdline = kernel_cmdline(config, &extra);
    let entry = Current::load_guest(&GuestSetup {
        vm: vm.fd(),
        mem: &mem,
        ram: &ram,
        boot: boot_source,
        cmdline: &cmdline,
        vcpu_count: machine.vcpu_count,
        devices: &slots,
    })?;
    phases.mark("load kernel, initrd, boot structures");

    let timer = BootTimer::new(
        ctx.started,
        ctx.started_cpu_us,
        ctx.boot_times.clone(),
        ctx.boot_timer_log,
    );
    let serial_out = ctx.serial_out;
    let make_serial = Box::new(move |irq, drained| {
        Ok(crate::devices::legacy::SerialDevice::new(
            irq, drained, serial_out,
        ))
    });
    let (legacy, pio) = Current::legacy_devices(vm.fd(), &mut mmio, timer, make_serial)?;
    phases.mark("devices");

    let configs = Current::vcpu_configs(vm.kvm(), vm.fd(), machine, profile, ctx.host)?;
    phases.mark("vCPU configurations");
    let mut configured = Vec::with_capacity(configs.len());
    for ((index, config), fd) in (0u8..).zip(configs).zip(vcpu_fds) {
        Current::configure_vcpu(&fd, index, &config, (index == 0).then_some(&entry))?;
        configured.push((fd, config));
    }
    phases.mark("configure vCPUs");
    let vcpus = start_vcpus(
        configured,
        &mem,
        (pio, mmio),
        false,
        &legacy.stopping,
        ctx.vcpu_seccomp.as_ref(),
    )?;
    phases.mark("spawn vCPU threads");
    Ok(RunningVm {
        vm,
        mem,
        ram,
        legacy,
        vcpus,
        cpu_profile: profile,
        devices,
        track_dirty: machine.track_dirty_pages,
        uffd: None,
    })
}
