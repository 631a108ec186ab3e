//! Capturing and restoring x86 KVM state for snapshots: per vCPU (registers, FPU/XSAVE, LAPIC,
//! MSRs, events, MP state, CPUID) and per VM (PIC, IO-APIC, PIT, KVM clock).
//!
//! In the file, KVM's structures are stored as their kernel ABI bytes (hex, length-checked on
//! load), CPUID entries and MSRs as flick's own records: the format depends on the kernel's ABI,
//! which is stable, not on how a crate serializes its types.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    CpuId, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use crate::arch::{kvm_error as fail, ArchError};

/// `#[serde(with = "abi")]`: a KVM structure as its ABI bytes in hex.
mod abi {
    use serde::{Deserializer, Serializer};
    use zerocopy::{FromBytes, Immutable, IntoBytes};

    pub fn serialize<T: IntoBytes + Immutable, S: Serializer>(
        value: &T,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        crate::hex::serialize(value.as_bytes(), serializer)
    }

    pub fn deserialize<'de, T: FromBytes, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<T, D::Error> {
        let bytes = crate::hex::deserialize(deserializer)?;
        T::read_from_bytes(&bytes).map_err(|_| {
            serde::de::Error::custom(format!(
                "expected {} bytes of {}, found {}",
                std::mem::size_of::<T>(),
                std::any::type_name::<T>()
                    .rsplit("::")
                    .next()
                    .unwrap_or("state"),
                bytes.len()
            ))
        })
    }
}

/// One CPUID leaf as saved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedCpuid {
    pub function: u32,
    pub index: u32,
    pub flags: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

impl From<&kvm_cpuid_entry2> for SavedCpuid {
    fn from(e: &kvm_cpuid_entry2) -> Self {
        SavedCpuid {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
        }
    }
}

impl From<&SavedCpuid> for kvm_cpuid_entry2 {
    fn from(e: &SavedCpuid) -> Self {
        kvm_cpuid_entry2 {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
            ..Default::default()
        }
    }
}

/// Everything KVM holds for one vCPU.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub cpuid: Vec<SavedCpuid>,
    /// `(index, value)` of each MSR this vCPU could read.
    pub msrs: Vec<(u32, u64)>,
    #[serde(with = "abi")]
    pub regs: kvm_regs,
    #[serde(with = "abi")]
    pub sregs: kvm_sregs,
    #[serde(with = "abi")]
    pub xsave: kvm_xsave,
    #[serde(with = "abi")]
    pub xcrs: kvm_xcrs,
    #[serde(with = "abi")]
    pub lapic: kvm_lapic_state,
    #[serde(with = "abi")]
    pub mp_state: kvm_mp_state,
    #[serde(with = "abi")]
    pub events: kvm_vcpu_events,
    #[serde(with = "abi")]
    pub debugregs: kvm_debugregs,
}

fn too_big(what: &str) -> ArchError {
    ArchError::Kvm(what.to_string(), kvm_ioctls::Error::new(libc::E2BIG))
}

/// The subset of `candidates` this vCPU can read: KVM_GET_MSRS stops at the first MSR it cannot
/// read, so those are dropped one by one.
fn readable_msrs(vcpu: &VcpuFd, candidates: &[u32]) -> Result<Vec<kvm_msr_entry>, ArchError> {
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
        let mut msrs = Msrs::from_entries(&chunk).map_err(|_| too_big("build the MSR list"))?;
        let n = vcpu.get_msrs(&mut msrs).map_err(fail("read MSRs"))?;
        readable.extend_from_slice(&msrs.as_slice()[..n]);
        let skip = if n < chunk.len() { n + 1 } else { n };
        indices.drain(..skip);
    }
    Ok(readable)
}

/// MSR indices KVM knows for this host.
pub fn msr_candidates(kvm: &Kvm) -> Result<Vec<u32>, ArchError> {
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
    ) -> Result<Self, ArchError> {
        Ok(VcpuState {
            cpuid: cpuid.as_slice().iter().map(SavedCpuid::from).collect(),
            msrs: readable_msrs(vcpu, msr_candidates)?
                .iter()
                .map(|m| (m.index, m.data))
                .collect(),
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

    /// Applies the state to a freshly created vCPU; returns the CPUID it now has.
    pub fn restore(&self, vcpu: &VcpuFd) -> Result<CpuId, ArchError> {
        let entries: Vec<kvm_cpuid_entry2> = self.cpuid.iter().map(Into::into).collect();
        let cpuid = CpuId::from_entries(&entries).map_err(|_| ArchError::SavedState("CPUID"))?;
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
        let entries: Vec<kvm_msr_entry> = self
            .msrs
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let msrs = Msrs::from_entries(&entries).map_err(|_| ArchError::SavedState("MSR list"))?;
        let written = vcpu.set_msrs(&msrs).map_err(fail("set MSRs"))?;
        if written != self.msrs.len() {
            let index = self.msrs.get(written).map_or(0, |m| m.0);
            tracing::warn!(
                "KVM refused MSR {index:#x}; {written} of {} restored",
                self.msrs.len()
            );
        }
        vcpu.set_vcpu_events(&self.events)
            .map_err(fail("set vCPU events"))?;
        Ok(cpuid)
    }
}

/// VM-wide KVM state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChipState {
    #[serde(with = "abi")]
    pub pic_master: kvm_irqchip,
    #[serde(with = "abi")]
    pub pic_slave: kvm_irqchip,
    #[serde(with = "abi")]
    pub ioapic: kvm_irqchip,
    #[serde(with = "abi")]
    pub pit: kvm_pit_state2,
    #[serde(with = "abi")]
    pub clock: kvm_clock_data,
}

fn irqchip(fd: &VmFd, chip_id: u32) -> Result<kvm_irqchip, ArchError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    fd.get_irqchip(&mut chip)
        .map_err(fail("read the irqchip"))?;
    Ok(chip)
}

impl ChipState {
    pub fn capture(fd: &VmFd) -> Result<Self, ArchError> {
        let mut clock = fd.get_clock().map_err(fail("read the KVM clock"))?;
        // Only the clock value is restorable; other flags describe the host.
        clock.flags = 0;
        Ok(ChipState {
            pic_master: irqchip(fd, KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: irqchip(fd, KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: irqchip(fd, KVM_IRQCHIP_IOAPIC)?,
            pit: fd.get_pit2().map_err(fail("read the PIT"))?,
            clock,
        })
    }

    /// Applies the state to a VM that already has its irqchip and PIT.
    pub fn restore(&self, fd: &VmFd) -> Result<(), ArchError> {
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
