//! x86_64: the memory map, boot protocols (64-bit Linux boot and PVH), CPUID, the MP table, the
//! in-kernel PIC/IO-APIC/PIT, port I/O exits, the 16550 serial port and i8042 on port I/O, and the
//! format of x86 vCPU and VM state in snapshots.

pub mod boot;
pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod regs;
pub mod state;
pub mod zeropage;

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use crate::memory::GuestMemoryMmap;
use kvm_bindings::{kvm_pit_config, CpuId, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{
    kvm_error, Arch, ArchError, ArchExit, DeviceSlot, GuestSetup, HostKind, Legacy, MakeSerial,
};
use crate::config::{CpuProfile, MachineConfig};
use crate::devices::boot_timer::BootTimer;
use crate::devices::bus::Bus;
use crate::devices::i8042::I8042;
use crate::devices::EventFdTrigger;
use layout::{
    BOOT_TIMER_START, EBDA_START, MMIO_SLOT_SIZE, PVH_INFO_START, PVH_MEMMAP_START,
    PVH_MODLIST_START, SERIAL_IRQ, SERIAL_PORT, ZERO_PAGE_START,
};
use regs::EntryMode;

/// Legacy port the older Firecracker guest images write the boot-timer byte to.
const LEGACY_BOOT_TIMER_PORT: u64 = 0x3f0;
const I8042_PORT: u64 = 0x60;
const I8042_PORT_LEN: u64 = 5;
const KEYBOARD_IRQ: u32 = 1;

/// On PVM hosts the guest kernel's CPUID instructions are not intercepted, so a CPUID profile
/// alone cannot hide features the instruction emulator lacks; Linux guests are told on their
/// command line instead (measured: without these a 6.1 guest stops on `xrstor` at FPU init).
pub const PVM_FEATURE_ARGS: &str = "clearcpuid=xsave,xsaveopt,xsavec,xsaves,smap,smep,popcnt,\
rdrand,rdseed,fsgsbase,avx,avx2,bmi1,bmi2,movbe,pcid,invpcid,rdpid,umip,pku,ospke";

/// The x86_64 architecture.
#[derive(Debug)]
pub struct X86_64;

fn input(e: boot::BootError) -> ArchError {
    ArchError::Input(Box::new(e))
}

fn eventfd() -> Result<EventFd, ArchError> {
    EventFd::new(EFD_NONBLOCK).map_err(ArchError::EventFd)
}

/// Where the boot vCPU starts: the entry protocol and address.
#[derive(Debug, Clone, Copy)]
pub struct BootEntry {
    pub mode: EntryMode,
    pub address: u64,
}

/// Writes the boot structures for `kernel` into guest memory.
fn write_boot_info(
    mem: &GuestMemoryMmap,
    kernel: &boot::LoadedKernel,
    info: &zeropage::BootInfo,
    ram: &[(u64, u64)],
    vcpus: u8,
) -> Result<(), ArchError> {
    let map = zeropage::memory_map(ram);
    let write = |bytes: &[u8], addr: u64| {
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(ArchError::GuestMemory)
    };
    write(&mptable::build(vcpus, EBDA_START), EBDA_START)?;
    match kernel.mode {
        EntryMode::Linux64 => {
            let params = zeropage::linux_boot_params(kernel.setup_header, info, &map);
            mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
                .map_err(ArchError::GuestMemory)?;
        }
        EntryMode::Pvh => {
            let blobs = zeropage::pvh_start_info(info, &map, PVH_MODLIST_START, PVH_MEMMAP_START);
            write(&blobs.start_info, PVH_INFO_START)?;
            write(&blobs.modlist, PVH_MODLIST_START)?;
            write(&blobs.memmap, PVH_MEMMAP_START)?;
        }
    }
    regs::write_boot_tables(mem, kernel.mode).map_err(ArchError::GuestMemory)
}

impl Arch for X86_64 {
    const NAME: &'static str = "x86_64";
    type VcpuConfig = CpuId;
    type VcpuState = state::VcpuState;
    type VmState = state::ChipState;
    type SaveContext = Arc<Vec<u32>>;
    type BootEntry = BootEntry;

    fn ram_ranges(mem_bytes: u64) -> Vec<(u64, u64)> {
        layout::ram_ranges(mem_bytes)
    }

    fn device_slot(index: usize) -> Option<DeviceSlot> {
        layout::device_slot(index)
    }

    fn effective_profile(profile: CpuProfile, host: HostKind) -> CpuProfile {
        match (profile, host) {
            (CpuProfile::Auto, HostKind::Pvm) => CpuProfile::Conservative,
            (CpuProfile::Auto, HostKind::HardwareVirt) => CpuProfile::Host,
            (other, _) => other,
        }
    }

    fn host_cmdline(profile: CpuProfile, host: HostKind) -> Option<&'static str> {
        (profile == CpuProfile::Conservative && host == HostKind::Pvm).then_some(PVM_FEATURE_ARGS)
    }

    /// The TSS, the in-kernel irqchip and the PIT. After memory registration: installing memory
    /// slots is several times slower on some hosts once an irqchip exists.
    fn setup_vm(vm: &VmFd) -> Result<(), ArchError> {
        vm.set_tss_address(layout::KVM_TSS_ADDRESS_USIZE)
            .map_err(kvm_error("set up the VM's TSS"))?;
        vm.create_irq_chip()
            .map_err(kvm_error("set up the VM's irqchip"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit)
            .map_err(kvm_error("set up the VM's PIT"))?;
        Ok(())
    }

    fn load_guest(setup: &GuestSetup<'_>) -> Result<BootEntry, ArchError> {
        let mem = setup.mem;
        let kernel = boot::load_kernel(mem, &setup.boot.kernel_image_path).map_err(input)?;
        let low_ram_end = setup.ram[0].1;
        let initrd = match &setup.boot.initrd_path {
            Some(path) => {
                Some(boot::load_initrd(mem, path, kernel.end, low_ram_end).map_err(input)?)
            }
            None => None,
        };
        boot::write_cmdline(mem, setup.cmdline).map_err(input)?;
        let info = zeropage::BootInfo {
            cmdline_addr: layout::CMDLINE_START,
            cmdline_len: setup.cmdline.len(),
            initrd,
        };
        write_boot_info(mem, &kernel, &info, setup.ram, setup.vcpu_count)?;
        Ok(BootEntry {
            mode: kernel.mode,
            address: kernel.entry,
        })
    }

    fn vcpu_configs(
        kvm: &Kvm,
        _: &VmFd,
        machine: &MachineConfig,
        profile: CpuProfile,
        host: HostKind,
    ) -> Result<Vec<CpuId>, ArchError> {
        let mut supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_error("read the supported CPUID"))?;
        if host == HostKind::Pvm {
            cpuid::hide_pv_hypercalls(supported.as_mut_slice());
        }
        // KVM emulates the TSC-deadline timer but leaves its CPUID bit for the VMM to set.
        if kvm.check_extension(Cap::TscDeadlineTimer) {
            cpuid::add_tsc_deadline(supported.as_mut_slice());
        }
        let topo = cpuid::Topology {
            vcpu_count: machine.vcpu_count,
            threads_per_core: if machine.smt { 2 } else { 1 },
        };
        Ok((0..machine.vcpu_count)
            .map(|index| cpuid::for_vcpu(&supported, index, topo, profile))
            .collect())
    }

    /// Applies CPUID, MSRs, LAPIC, FPU and (boot vCPU) registers.
    fn configure_vcpu(
        fd: &VcpuFd,
        index: u8,
        cpuid: &CpuId,
        entry: Option<&BootEntry>,
    ) -> Result<(), ArchError> {
        let fail = |what: &'static str| {
            move |e| ArchError::Kvm(format!("configure vCPU {index}: {what}"), e)
        };
        fd.set_cpuid2(cpuid).map_err(fail("CPUID"))?;
        let msrs = regs::boot_msrs();
        let written = fd.set_msrs(&msrs).map_err(fail("MSRs"))?;
        if written != msrs.as_slice().len() {
            tracing::debug!(
                "vCPU {index}: KVM accepted {written} of {} boot MSRs",
                msrs.as_slice().len()
            );
        }
        regs::set_lint(fd).map_err(fail("LAPIC"))?;
        fd.set_fpu(&regs::boot_fpu()).map_err(fail("FPU"))?;
        if let Some(entry) = entry {
            let sregs = fd.get_sregs().map_err(fail("special registers"))?;
            fd.set_sregs(&regs::boot_sregs(sregs, entry.mode))
                .map_err(fail("special registers"))?;
            fd.set_regs(&regs::boot_regs(entry.mode, entry.address))
                .map_err(fail("registers"))?;
        }
        Ok(())
    }

    /// Serial on COM1 and the i8042 on port I/O; the boot timer on MMIO and its legacy port.
    fn legacy_devices(
        vm: &VmFd,
        mmio: &mut Bus,
        timer: BootTimer,
        make_serial: MakeSerial<'_>,
    ) -> Result<(Legacy, Bus), ArchError> {
        let irqfd = |evt: &EventFd, gsi| {
            vm.register_irqfd(evt, gsi)
                .map_err(kvm_error("set up the VM's irqfd"))
        };
        let serial_irq = eventfd()?;
        irqfd(&serial_irq, SERIAL_IRQ)?;
        let serial_drained = eventfd()?;
        let drained = EventFdTrigger(serial_drained.try_clone().map_err(ArchError::EventFd)?);
        let serial =
            make_serial(EventFdTrigger(serial_irq), drained).map_err(ArchError::SerialState)?;
        let serial = Arc::new(Mutex::new(serial));
        let reset = eventfd()?;
        let stopping = Arc::new(AtomicBool::new(false));
        let keyboard_irq = eventfd()?;
        irqfd(&keyboard_irq, KEYBOARD_IRQ)?;
        let i8042 = Arc::new(Mutex::new(I8042::new(
            EventFdTrigger(reset.try_clone().map_err(ArchError::EventFd)?),
            EventFdTrigger(keyboard_irq),
            stopping.clone(),
        )));
        let timer = Arc::new(Mutex::new(timer));
        let mut pio = Bus::new();
        pio.insert(serial.clone(), u64::from(SERIAL_PORT), 8)
            .map_err(ArchError::Bus)?;
        pio.insert(i8042.clone(), I8042_PORT, I8042_PORT_LEN)
            .map_err(ArchError::Bus)?;
        pio.insert(timer.clone(), LEGACY_BOOT_TIMER_PORT, 1)
            .map_err(ArchError::Bus)?;
        mmio.insert(timer, BOOT_TIMER_START, MMIO_SLOT_SIZE)
            .map_err(ArchError::Bus)?;
        let legacy = Legacy {
            serial,
            serial_drained,
            reset,
            i8042: Some(i8042),
            stopping,
        };
        Ok((legacy, pio))
    }

    fn handle_exit(exit: VcpuExit<'_>, pio: &Bus) -> ArchExit {
        match exit {
            VcpuExit::IoIn(port, data) => {
                let claimed = pio.read(u64::from(port), data);
                if !claimed {
                    data.fill(0xff);
                }
                ArchExit::PortIo {
                    read: true,
                    claimed,
                }
            }
            VcpuExit::IoOut(port, data) => ArchExit::PortIo {
                read: false,
                claimed: pio.write(u64::from(port), data),
            },
            VcpuExit::Shutdown => ArchExit::Fault("triple fault (KVM_EXIT_SHUTDOWN)".into()),
            VcpuExit::Hlt => ArchExit::Fault("halt with interrupts off (KVM_EXIT_HLT)".into()),
            _ => ArchExit::Unknown,
        }
    }

    /// RIP and the instruction bytes there.
    fn stop_location(fd: &VcpuFd, mem: &GuestMemoryMmap) -> String {
        let Ok(regs) = fd.get_regs() else {
            return String::new();
        };
        let bytes = fd
            .translate_gva(regs.rip)
            .ok()
            .filter(|t| t.valid != 0)
            .and_then(|t| {
                let mut buf = [0u8; 15];
                mem.read_slice(&mut buf, GuestAddress(t.physical_address))
                    .ok()?;
                Some(
                    buf.iter()
                        .map(|b| format!("{b:02x}"))
                        .collect::<Vec<_>>()
                        .join(" "),
                )
            })
            .unwrap_or_else(|| "unavailable".into());
        format!(" at RIP {:#x} (instruction bytes: {bytes})", regs.rip)
    }

    fn save_context(kvm: &Kvm) -> Result<Arc<Vec<u32>>, ArchError> {
        Ok(Arc::new(state::msr_candidates(kvm)?))
    }

    fn save_vcpu(
        fd: &VcpuFd,
        cpuid: &CpuId,
        msrs: &Arc<Vec<u32>>,
    ) -> Result<state::VcpuState, ArchError> {
        state::VcpuState::capture(fd, cpuid, msrs)
    }

    fn restore_vcpu(fd: &VcpuFd, saved: &state::VcpuState) -> Result<CpuId, ArchError> {
        saved.restore(fd)
    }

    fn save_vm(vm: &VmFd) -> Result<state::ChipState, ArchError> {
        state::ChipState::capture(vm)
    }

    fn restore_vm(vm: &VmFd, saved: &state::ChipState) -> Result<(), ArchError> {
        saved.restore(vm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vcpus_get_the_tsc_deadline_timer_when_kvm_emulates_it() {
        let Ok(kvm) = Kvm::new() else {
            eprintln!("[SKIP] arch::x86_64 TSC-deadline test: no /dev/kvm");
            return;
        };
        let machine = MachineConfig::default();
        let vm = kvm.create_vm().unwrap();
        let configs =
            X86_64::vcpu_configs(&kvm, &vm, &machine, CpuProfile::Host, HostKind::detect())
                .unwrap();
        let leaf1 = configs[0]
            .as_slice()
            .iter()
            .find(|e| e.function == 1)
            .map(|e| e.ecx)
            .unwrap();
        let expected = kvm.check_extension(Cap::TscDeadlineTimer);
        assert_eq!(leaf1 & cpuid::LEAF1_ECX_TSC_DEADLINE != 0, expected);
    }
}
