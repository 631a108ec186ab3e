//! aarch64 vCPU and GICv3 state in snapshots.
//!
//! A vCPU is its `KVM_ARM_VCPU_INIT` configuration, every register KVM lists for it
//! (`KVM_GET_REG_LIST`: core, system, FP/SIMD, timer and firmware registers) read through
//! ONE_REG, and its power state. The GIC is its distributor registers for the SPIs, and per vCPU
//! its redistributor (SGI/PPI) registers and CPU-interface system registers, all through the
//! device's attribute groups. Edge-triggered lines only (flick's devices use no level lines).
//! With an ITS, also the redistributors' LPI table addresses, the pending LPIs (which KVM
//! writes into the guest's pending tables), the ITS's own tables (device, collection and
//! translation tables, which KVM writes into guest memory before the memory is saved) and its
//! registers; restored in the order KVM's ITS documentation gives.

use kvm_bindings::{
    kvm_mp_state, kvm_vcpu_init, RegList, KVM_DEV_ARM_ITS_RESTORE_TABLES,
    KVM_DEV_ARM_ITS_SAVE_TABLES, KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS, KVM_DEV_ARM_VGIC_GRP_CTRL,
    KVM_DEV_ARM_VGIC_GRP_DIST_REGS, KVM_DEV_ARM_VGIC_GRP_ITS_REGS,
    KVM_DEV_ARM_VGIC_GRP_REDIST_REGS, KVM_DEV_ARM_VGIC_SAVE_PENDING_TABLES, KVM_REG_SIZE_MASK,
    KVM_REG_SIZE_SHIFT,
};
use kvm_ioctls::{DeviceFd, VcpuFd};
use serde::{Deserialize, Serialize};

use super::gic::Gic;
use super::layout::{mpidr, GIC_NR_IRQS};
use crate::arch::ArchError;

/// One vCPU.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VcpuState {
    pub init: kvm_vcpu_init,
    /// `(ONE_REG id, value bytes)` in KVM's list order.
    pub regs: Vec<(u64, Vec<u8>)>,
    pub mp_state: u32,
}

fn vcpu_fail(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> ArchError {
    move |e| ArchError::Kvm(format!("{what} of a vCPU"), e)
}

/// The most registers kvm-bindings' list holds.
const MAX_REGS: usize = 500;

/// KVM's register list for `fd`.
fn reg_list(fd: &VcpuFd) -> Result<Vec<u64>, ArchError> {
    let mut list =
        RegList::new(MAX_REGS).map_err(|_| ArchError::SavedState("vCPU register list size"))?;
    fd.get_reg_list(&mut list)
        .map_err(vcpu_fail("read the register list"))?;
    Ok(list.as_slice().to_vec())
}

fn reg_size(id: u64) -> usize {
    1usize << ((id & KVM_REG_SIZE_MASK) >> KVM_REG_SIZE_SHIFT)
}

impl VcpuState {
    /// Reads a paused vCPU initialised with `init`.
    pub fn capture(fd: &VcpuFd, init: &kvm_vcpu_init) -> Result<VcpuState, ArchError> {
        let mut regs = Vec::new();
        for id in reg_list(fd)? {
            let mut value = vec![0u8; reg_size(id)];
            fd.get_one_reg(id, &mut value)
                .map_err(|e| ArchError::Kvm(format!("read register {id:#x} of a vCPU"), e))?;
            regs.push((id, value));
        }
        let mp_state = fd
            .get_mp_state()
            .map_err(vcpu_fail("read the power state"))?
            .mp_state;
        Ok(VcpuState {
            init: *init,
            regs,
            mp_state,
        })
    }

    /// Initialises a new vCPU and writes the saved registers and power state into it.
    pub fn restore(&self, fd: &VcpuFd) -> Result<kvm_vcpu_init, ArchError> {
        fd.vcpu_init(&self.init)
            .map_err(vcpu_fail("initialise (KVM_ARM_VCPU_INIT)"))?;
        super::vcpu::setup_pmu(fd, &self.init)?;
        for (id, value) in &self.regs {
            if value.len() != reg_size(*id) {
                return Err(ArchError::SavedState("vCPU register size"));
            }
            fd.set_one_reg(*id, value)
                .map_err(|e| ArchError::Kvm(format!("write register {id:#x} of a vCPU"), e))?;
        }
        fd.set_mp_state(kvm_mp_state {
            mp_state: self.mp_state,
        })
        .map_err(vcpu_fail("write the power state"))?;
        Ok(self.init)
    }
}

/// The GICv3.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GicState {
    /// `(offset, value)` of 32-bit distributor registers.
    pub dist: Vec<(u32, u32)>,
    /// Per vCPU: `(offset, value)` of 32-bit redistributor registers.
    pub redist: Vec<Vec<(u32, u32)>>,
    /// Per vCPU: `(system register id, value)` of the CPU interface.
    pub icc: Vec<Vec<(u32, u64)>>,
    /// The ITS's registers, if the VM had an ITS (its tables are in guest memory).
    #[serde(default)]
    pub its: Option<Vec<(u32, u64)>>,
}

/// ITS registers (offsets in its control frame), in write-back order: GITS_CBASER first, then
/// the others but GITS_CTLR (GITS_IIDR, whose revision selects the table format, before the
/// tables are loaded), GITS_CTLR last, after the tables.
const ITS_CTLR: u32 = 0x0000;
const ITS_REGS: [u32; 13] = [
    0x0080, // GITS_CBASER
    0x0004, // GITS_IIDR
    0x0090, // GITS_CREADR
    0x0088, // GITS_CWRITER
    0x0100, // GITS_BASER0 ... GITS_BASER7
    0x0108, 0x0110, 0x0118, 0x0120, 0x0128, 0x0130, 0x0138, ITS_CTLR,
];

/// Distributor registers for SPIs (the private interrupts live in the redistributors), in the
/// order they are written back: configuration before enables and pending state, control last.
fn dist_offsets() -> Vec<u32> {
    let spis = 32..GIC_NR_IRQS;
    let per = |base: u32, irqs_per_word: u32| {
        spis.clone()
            .step_by(irqs_per_word as usize)
            .map(move |irq| base + irq / irqs_per_word * 4)
    };
    let mut offsets: Vec<u32> = Vec::new();
    offsets.extend(per(0x0080, 32)); // IGROUPR
    offsets.extend(per(0x0d00, 32)); // IGRPMODR
    offsets.extend(per(0x0c00, 16)); // ICFGR
    offsets.extend(per(0x0400, 4)); // IPRIORITYR
    offsets.extend(
        spis.clone()
            .flat_map(|irq| [0x6000 + irq * 8, 0x6004 + irq * 8]),
    ); // IROUTER
    offsets.extend(per(0x0100, 32)); // ISENABLER
    offsets.extend(per(0x0200, 32)); // ISPENDR
    offsets.extend(per(0x0300, 32)); // ISACTIVER
    offsets.push(0x0000); // CTLR
    offsets
}

/// Redistributor registers of one vCPU (its SGI frame at +64 KiB), in write-back order; with
/// LPIs (an ITS), the LPI table addresses too, before GICR_CTLR and its EnableLPIs bit.
fn redist_offsets(lpis: bool) -> Vec<u32> {
    let mut offsets = vec![0x1_0080, 0x1_0d00, 0x1_0c00, 0x1_0c04]; // IGROUPR0, IGRPMODR0, ICFGR0/1
    offsets.extend((0..8).map(|n| 0x1_0400 + n * 4)); // IPRIORITYR0-7
    offsets.extend([0x1_0100, 0x1_0200, 0x1_0300]); // ISENABLER0, ISPENDR0, ISACTIVER0
    if lpis {
        // GICR_PROPBASER and GICR_PENDBASER, 64-bit registers in 32-bit halves.
        offsets.extend([0x0070, 0x0074, 0x0078, 0x007c]);
    }
    offsets.push(0x0000); // GICR_CTLR
    offsets
}

/// A system register id as the CPU-interface attribute group encodes it.
const fn sysreg(op0: u32, op1: u32, crn: u32, crm: u32, op2: u32) -> u32 {
    (op0 << 14) | (op1 << 11) | (crn << 7) | (crm << 3) | op2
}

/// CPU-interface registers, in write-back order (SRE and CTLR first, group enables last). The
/// active-priority registers beyond the first exist only with more priority bits; those KVM
/// refuses to read are left out.
fn icc_regs() -> Vec<u32> {
    let mut regs = vec![
        sysreg(3, 0, 12, 12, 5), // ICC_SRE_EL1
        sysreg(3, 0, 12, 12, 4), // ICC_CTLR_EL1
        sysreg(3, 0, 4, 6, 0),   // ICC_PMR_EL1
        sysreg(3, 0, 12, 8, 3),  // ICC_BPR0_EL1
        sysreg(3, 0, 12, 12, 3), // ICC_BPR1_EL1
    ];
    regs.extend((0..4).map(|n| sysreg(3, 0, 12, 8, 4 + n))); // ICC_AP0R<n>_EL1
    regs.extend((0..4).map(|n| sysreg(3, 0, 12, 9, n))); // ICC_AP1R<n>_EL1
    regs.push(sysreg(3, 0, 12, 12, 6)); // ICC_IGRPEN0_EL1
    regs.push(sysreg(3, 0, 12, 12, 7)); // ICC_IGRPEN1_EL1
    regs
}

fn attr(group: u32, attr: u64, addr: u64) -> kvm_bindings::kvm_device_attr {
    kvm_bindings::kvm_device_attr {
        flags: 0,
        group,
        attr,
        addr,
    }
}

fn get32(gic: &DeviceFd, group: u32, a: u64) -> Result<u32, kvm_ioctls::Error> {
    let mut value: u32 = 0;
    let mut request = attr(group, a, std::ptr::addr_of_mut!(value) as u64);
    // SAFETY: `addr` points at a u32, the size KVM writes for distributor and redistributor
    // registers; it outlives the call.
    unsafe { gic.get_device_attr(&mut request) }?;
    Ok(value)
}

fn get64(gic: &DeviceFd, group: u32, a: u64) -> Result<u64, kvm_ioctls::Error> {
    let mut value: u64 = 0;
    let mut request = attr(group, a, std::ptr::addr_of_mut!(value) as u64);
    // SAFETY: `addr` points at a u64, the size KVM writes for CPU-interface registers; it
    // outlives the call.
    unsafe { gic.get_device_attr(&mut request) }?;
    Ok(value)
}

fn set(gic: &DeviceFd, group: u32, a: u64, addr: u64, what: &str) -> Result<(), ArchError> {
    gic.set_device_attr(&attr(group, a, addr))
        .map_err(|e| ArchError::Kvm(format!("restore the GICv3's {what} ({a:#x})"), e))
}

/// A control-group command without an argument (table saves and loads).
fn control(device: &DeviceFd, command: u32, what: &str) -> Result<(), ArchError> {
    device
        .set_device_attr(&attr(KVM_DEV_ARM_VGIC_GRP_CTRL, u64::from(command), 0))
        .map_err(|e| ArchError::Kvm(format!("GICv3: {what}"), e))
}

/// Reads the ITS after writing its tables and the pending LPIs into guest memory.
fn capture_its(gic: &DeviceFd, its: &DeviceFd) -> Result<Vec<(u32, u64)>, ArchError> {
    control(
        gic,
        KVM_DEV_ARM_VGIC_SAVE_PENDING_TABLES,
        "save the pending LPIs",
    )?;
    control(its, KVM_DEV_ARM_ITS_SAVE_TABLES, "save the ITS tables")?;
    ITS_REGS
        .iter()
        .map(|&off| {
            get64(its, KVM_DEV_ARM_VGIC_GRP_ITS_REGS, u64::from(off))
                .map(|v| (off, v))
                .map_err(|e| ArchError::Kvm(format!("read the ITS register {off:#x}"), e))
        })
        .collect()
}

/// Writes the ITS back: every register but GITS_CTLR, the tables from guest memory, GITS_CTLR.
fn restore_its(its: &DeviceFd, regs: &[(u32, u64)]) -> Result<(), ArchError> {
    let write = |(off, value): &(u32, u64)| {
        let addr = std::ptr::from_ref(value) as u64;
        set(
            its,
            KVM_DEV_ARM_VGIC_GRP_ITS_REGS,
            u64::from(*off),
            addr,
            "ITS",
        )
    };
    regs.iter()
        .filter(|(off, _)| *off != ITS_CTLR)
        .try_for_each(write)?;
    control(its, KVM_DEV_ARM_ITS_RESTORE_TABLES, "load the ITS tables")?;
    regs.iter()
        .filter(|(off, _)| *off == ITS_CTLR)
        .try_for_each(write)
}

impl GicState {
    /// Reads the GIC of a paused VM.
    pub fn capture(vgic: &Gic) -> Result<GicState, ArchError> {
        let (gic, vcpus, lpis) = (&vgic.gic, vgic.vcpus, vgic.its.is_some());
        // First: the table saves write guest memory and the pending state they flush.
        let its = match &vgic.its {
            Some(its) => Some(capture_its(gic, its)?),
            None => None,
        };
        let fail =
            |what: &'static str| move |e| ArchError::Kvm(format!("read the GICv3's {what}"), e);
        let dist = dist_offsets()
            .into_iter()
            .map(|off| get32(gic, KVM_DEV_ARM_VGIC_GRP_DIST_REGS, u64::from(off)).map(|v| (off, v)))
            .collect::<Result<_, _>>()
            .map_err(fail("distributor"))?;
        let mut redist = Vec::new();
        let mut icc = Vec::new();
        for index in 0..vcpus {
            let cpu = mpidr(index) << 32;
            redist.push(
                redist_offsets(lpis)
                    .into_iter()
                    .map(|off| {
                        get32(gic, KVM_DEV_ARM_VGIC_GRP_REDIST_REGS, cpu | u64::from(off))
                            .map(|v| (off, v))
                    })
                    .collect::<Result<_, _>>()
                    .map_err(fail("redistributor"))?,
            );
            icc.push(
                icc_regs()
                    .into_iter()
                    .filter_map(|reg| {
                        get64(gic, KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS, cpu | u64::from(reg))
                            .ok()
                            .map(|v| (reg, v))
                    })
                    .collect(),
            );
        }
        Ok(GicState {
            dist,
            redist,
            icc,
            its,
        })
    }

    /// Writes the state into a new GIC whose vCPUs are initialised.
    pub fn restore(&self, vgic: &Gic) -> Result<(), ArchError> {
        let (gic, vcpus) = (&vgic.gic, vgic.vcpus);
        if self.redist.len() != usize::from(vcpus) || self.icc.len() != usize::from(vcpus) {
            return Err(ArchError::SavedState("GICv3 state: vCPU count"));
        }
        if self.its.is_some() && vgic.its.is_none() {
            return Err(ArchError::SavedState(
                "GICv3 state: the snapshot has an ITS, and this host's KVM offers none",
            ));
        }
        for (off, value) in &self.dist {
            let addr = std::ptr::from_ref(value) as u64;
            set(
                gic,
                KVM_DEV_ARM_VGIC_GRP_DIST_REGS,
                u64::from(*off),
                addr,
                "distributor",
            )?;
        }
        for (index, (redist, icc)) in (0u8..).zip(self.redist.iter().zip(&self.icc)) {
            let cpu = mpidr(index) << 32;
            for (reg, value) in icc {
                let addr = std::ptr::from_ref(value) as u64;
                let a = cpu | u64::from(*reg);
                set(
                    gic,
                    KVM_DEV_ARM_VGIC_GRP_CPU_SYSREGS,
                    a,
                    addr,
                    "CPU interface",
                )?;
            }
            for (off, value) in redist {
                let addr = std::ptr::from_ref(value) as u64;
                let a = cpu | u64::from(*off);
                set(
                    gic,
                    KVM_DEV_ARM_VGIC_GRP_REDIST_REGS,
                    a,
                    addr,
                    "redistributor",
                )?;
            }
        }
        // The ITS after the redistributors.
        match (&self.its, &vgic.its) {
            (Some(regs), Some(its)) => restore_its(its, regs),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_sets_cover_the_spis_once() {
        let dist = dist_offsets();
        let mut sorted = dist.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), dist.len());
        // 96 SPIs: 3 words of 1-bit fields (x5 kinds), 6 of ICFGR, 24 of IPRIORITYR, 192 halves
        // of IROUTER, and CTLR.
        assert_eq!(dist.len(), 3 * 5 + 6 + 24 + 192 + 1);
        assert_eq!(*dist.last().unwrap(), 0);
        // GICR_CTLR (EnableLPIs) after the LPI table addresses; GITS_CTLR last, CBASER first.
        assert_eq!(redist_offsets(true).last(), Some(&0));
        assert_eq!(redist_offsets(true).len(), redist_offsets(false).len() + 4);
        assert_eq!(ITS_REGS.last(), Some(&ITS_CTLR));
        assert_eq!(ITS_REGS[0], 0x0080);
        assert_eq!(sysreg(3, 0, 12, 12, 5), 0xc665);
        assert_eq!(reg_size(0x6030_0000_0010_0040), 8);
        assert_eq!(reg_size(0x6040_0000_0010_0054), 16);
    }
}
