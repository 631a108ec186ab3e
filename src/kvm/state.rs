//! Capturing and restoring KVM state for snapshots: per vCPU (registers, FPU/XSAVE, LAPIC, MSRs,
//! events, MP state, CPUID) and per VM (PIC, IO-APIC, PIT, KVM clock).

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    CpuId, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
#[error("cannot {0}")]
pub struct StateError(pub String, #[source] pub kvm_ioctls::Error);

fn fail(what: &str) -> impl FnOnce(kvm_ioctls::Error) -> StateError + '_ {
    move |e| StateError(what.to_string(), e)
}

/// Everything KVM holds for one vCPU.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub msrs: Vec<kvm_msr_entry>,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub lapic: kvm_lapic_state,
    pub mp_state: kvm_mp_state,
    pub events: kvm_vcpu_events,
    pub debugregs: kvm_debugregs,
}

/// The subset of `candidates` this vCPU can read: KVM_GET_MSRS stops at the first MSR it cannot
/// read, so those are dropped one by one.
fn readable_msrs(vcpu: &VcpuFd, candidates: &[u32]) -> Result<Vec<kvm_msr_entry>, StateError> {
    let mut indices = candidates.to_vec();
    let mut readable = Vec::with_capacity(indices.len());
    while !indices.is_empty() {
        let chunk: Vec<kvm_msr_entry> = indices
            .iter()
            .take(kvm_bindings::KVM_MAX_MSR_ENTRIES)
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&chunk).map_err(|_| {
            StateError(
                "build the MSR list".into(),
                kvm_ioctls::Error::new(libc::E2BIG),
            )
        })?;
        let n = vcpu.get_msrs(&mut msrs).map_err(fail("read MSRs"))?;
        readable.extend_from_slice(&msrs.as_slice()[..n]);
        let skip = if n < chunk.len() { n + 1 } else { n };
        indices.drain(..skip);
    }
    Ok(readable)
}

/// MSR indices KVM knows for this host.
pub fn msr_candidates(kvm: &Kvm) -> Result<Vec<u32>, StateError> {
    Ok(kvm
        .get_msr_index_list()
        .map_err(fail("list MSRs"))?
        .as_slice()
        .to_vec())
}

impl VcpuState {
    /// Reads the state of a stopped vCPU.
    pub fn capture(
        vcpu: &VcpuFd,
        cpuid: &CpuId,
        msr_candidates: &[u32],
    ) -> Result<Self, StateError> {
        Ok(VcpuState {
            cpuid: cpuid.as_slice().to_vec(),
            msrs: readable_msrs(vcpu, msr_candidates)?,
            mp_state: vcpu.get_mp_state().map_err(fail("read the MP state"))?,
            regs: vcpu.get_regs().map_err(fail("read registers"))?,
            sregs: vcpu.get_sregs().map_err(fail("read special registers"))?,
            xsave: vcpu.get_xsave().map_err(fail("read XSAVE state"))?,
            xcrs: vcpu.get_xcrs().map_err(fail("read XCRs"))?,
            lapic: vcpu.get_lapic().map_err(fail("read the LAPIC"))?,
            events: vcpu.get_vcpu_events().map_err(fail("read vCPU events"))?,
            debugregs: vcpu
                .get_debug_regs()
                .map_err(fail("read debug registers"))?,
        })
    }

    /// Applies the state to a freshly created vCPU.
    pub fn restore(&self, vcpu: &VcpuFd) -> Result<(), StateError> {
        let cpuid = CpuId::from_entries(&self.cpuid).map_err(|_| {
            StateError(
                "build the CPUID list".into(),
                kvm_ioctls::Error::new(libc::E2BIG),
            )
        })?;
        vcpu.set_cpuid2(&cpuid).map_err(fail("set CPUID"))?;
        vcpu.set_mp_state(self.mp_state)
            .map_err(fail("set the MP state"))?;
        vcpu.set_sregs(&self.sregs)
            .map_err(fail("set special registers"))?;
        vcpu.set_regs(&self.regs).map_err(fail("set registers"))?;
        // SAFETY: `xsave` is a complete kvm_xsave read from KVM by `capture`.
        unsafe { vcpu.set_xsave(&self.xsave) }.map_err(fail("set XSAVE state"))?;
        vcpu.set_xcrs(&self.xcrs).map_err(fail("set XCRs"))?;
        vcpu.set_debug_regs(&self.debugregs)
            .map_err(fail("set debug registers"))?;
        vcpu.set_lapic(&self.lapic).map_err(fail("set the LAPIC"))?;
        let msrs = Msrs::from_entries(&self.msrs).map_err(|_| {
            StateError(
                "build the MSR list".into(),
                kvm_ioctls::Error::new(libc::E2BIG),
            )
        })?;
        let written = vcpu.set_msrs(&msrs).map_err(fail("set MSRs"))?;
        if written != self.msrs.len() {
            let index = self.msrs.get(written).map_or(0, |m| m.index);
            tracing::warn!(
                "KVM refused MSR {index:#x}; {written} of {} restored",
                self.msrs.len()
            );
        }
        vcpu.set_vcpu_events(&self.events)
            .map_err(fail("set vCPU events"))?;
        Ok(())
    }
}

/// VM-wide KVM state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

fn irqchip(fd: &VmFd, chip_id: u32) -> Result<kvm_irqchip, StateError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    fd.get_irqchip(&mut chip)
        .map_err(fail("read the irqchip"))?;
    Ok(chip)
}

impl VmState {
    pub fn capture(fd: &VmFd) -> Result<Self, StateError> {
        let mut clock = fd.get_clock().map_err(fail("read the KVM clock"))?;
        // Only the clock value is restorable; other flags describe the host.
        clock.flags = 0;
        Ok(VmState {
            pic_master: irqchip(fd, KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: irqchip(fd, KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: irqchip(fd, KVM_IRQCHIP_IOAPIC)?,
            pit: fd.get_pit2().map_err(fail("read the PIT"))?,
            clock,
        })
    }

    /// Applies the state to a VM that already has its irqchip and PIT.
    pub fn restore(&self, fd: &VmFd) -> Result<(), StateError> {
        fd.set_irqchip(&self.pic_master)
            .map_err(fail("set the PIC"))?;
        fd.set_irqchip(&self.pic_slave)
            .map_err(fail("set the PIC"))?;
        fd.set_irqchip(&self.ioapic)
            .map_err(fail("set the IO-APIC"))?;
        fd.set_pit2(&self.pit).map_err(fail("set the PIT"))?;
        fd.set_clock(&self.clock)
            .map_err(fail("set the KVM clock"))?;
        Ok(())
    }
}
