//! vCPU set-up: `KVM_ARM_VCPU_INIT` with the host's preferred target, PSCI 0.2 and, where KVM
//! offers one, a PMU (secondary vCPUs start powered off and wait for PSCI CPU_ON), the PMU's
//! interrupt, and the boot registers through ONE_REG.

use std::mem::offset_of;

use kvm_bindings::{
    kvm_device_attr, kvm_regs, kvm_vcpu_init, user_pt_regs, KVM_ARM_VCPU_PMU_V3,
    KVM_ARM_VCPU_PMU_V3_CTRL, KVM_ARM_VCPU_PMU_V3_INIT, KVM_ARM_VCPU_PMU_V3_IRQ,
    KVM_ARM_VCPU_POWER_OFF, KVM_ARM_VCPU_PSCI_0_2, KVM_REG_ARM64, KVM_REG_ARM_CORE,
    KVM_REG_SIZE_U64,
};
use kvm_ioctls::{Cap, VcpuFd, VmFd};

use crate::arch::{kvm_error, ArchError};

/// PSTATE at boot: EL1 with its own stack pointer (EL1h), debug, SError, IRQ and FIQ masked.
const BOOT_PSTATE: u64 = 0x3c5;

/// The ONE_REG id of the 64-bit core register at byte `offset` of `struct kvm_regs`.
fn core_reg(offset: usize) -> u64 {
    KVM_REG_ARM64 | KVM_REG_SIZE_U64 | u64::from(KVM_REG_ARM_CORE) | (offset / 4) as u64
}

/// General-purpose register `n` (X0-X30).
pub fn x_reg(n: usize) -> u64 {
    core_reg(offset_of!(kvm_regs, regs) + offset_of!(user_pt_regs, regs) + n * 8)
}

pub fn pc_reg() -> u64 {
    core_reg(offset_of!(kvm_regs, regs) + offset_of!(user_pt_regs, pc))
}

pub fn pstate_reg() -> u64 {
    core_reg(offset_of!(kvm_regs, regs) + offset_of!(user_pt_regs, pstate))
}

/// The PMU's overflow interrupt: PPI 7, interrupt id 23 (the device tree's `pmu` node).
pub const PMU_PPI: u32 = 7;

/// Whether KVM gives this VM's vCPUs a PMU (`KVM_CAP_ARM_PMU_V3`).
pub fn pmu_available(vm: &VmFd) -> bool {
    vm.check_extension(Cap::ArmPmuV3)
}

/// The host's preferred vCPU target with PSCI 0.2, and a PMU where KVM offers one.
pub fn preferred_init(vm: &VmFd) -> Result<kvm_vcpu_init, ArchError> {
    let mut init = kvm_vcpu_init::default();
    vm.get_preferred_target(&mut init).map_err(kvm_error(
        "read the preferred vCPU target (KVM_ARM_PREFERRED_TARGET)",
    ))?;
    init.features[0] |= 1 << KVM_ARM_VCPU_PSCI_0_2;
    if pmu_available(vm) {
        init.features[0] |= 1 << KVM_ARM_VCPU_PMU_V3;
    }
    Ok(init)
}

/// Gives an initialised vCPU whose `init` asked for a PMU its interrupt and initialises the PMU
/// (KVM wants both after the GIC is initialised and before the vCPU first runs).
pub fn setup_pmu(fd: &VcpuFd, init: &kvm_vcpu_init) -> Result<(), ArchError> {
    if init.features[0] & (1 << KVM_ARM_VCPU_PMU_V3) == 0 {
        return Ok(());
    }
    let irq: u32 = PMU_PPI + 16;
    let set_irq = kvm_device_attr {
        group: KVM_ARM_VCPU_PMU_V3_CTRL,
        attr: u64::from(KVM_ARM_VCPU_PMU_V3_IRQ),
        addr: std::ptr::addr_of!(irq) as u64,
        flags: 0,
    };
    fd.set_device_attr(&set_irq)
        .map_err(kvm_error("set the vCPU PMU's interrupt"))?;
    let start = kvm_device_attr {
        group: KVM_ARM_VCPU_PMU_V3_CTRL,
        attr: u64::from(KVM_ARM_VCPU_PMU_V3_INIT),
        addr: 0,
        flags: 0,
    };
    fd.set_device_attr(&start)
        .map_err(kvm_error("initialise the vCPU's PMU"))
}

/// Initialises vCPU `index`; every vCPU but the first starts powered off.
pub fn init(fd: &VcpuFd, index: u8, base: &kvm_vcpu_init) -> Result<(), ArchError> {
    let mut init = *base;
    if index > 0 {
        init.features[0] |= 1 << KVM_ARM_VCPU_POWER_OFF;
    }
    fd.vcpu_init(&init)
        .map_err(|e| ArchError::Kvm(format!("initialise vCPU {index} (KVM_ARM_VCPU_INIT)"), e))?;
    setup_pmu(fd, &init)
}

fn set(fd: &VcpuFd, id: u64, value: u64, what: &str) -> Result<(), ArchError> {
    fd.set_one_reg(id, &value.to_le_bytes())
        .map(|_| ())
        .map_err(|e| ArchError::Kvm(format!("set the boot vCPU's {what}"), e))
}

/// Points the boot vCPU at the kernel: PC = entry, X0 = the device tree, X1-X3 = 0, PSTATE.
pub fn set_boot_regs(fd: &VcpuFd, entry: u64, fdt: u64) -> Result<(), ArchError> {
    set(fd, pstate_reg(), BOOT_PSTATE, "PSTATE")?;
    set(fd, pc_reg(), entry, "PC")?;
    set(fd, x_reg(0), fdt, "X0")?;
    for n in 1..4 {
        set(fd, x_reg(n), 0, "X1-X3")?;
    }
    Ok(())
}

/// The vCPU's PC, if KVM reports it.
pub fn pc(fd: &VcpuFd) -> Option<u64> {
    let mut bytes = [0u8; 8];
    fd.get_one_reg(pc_reg(), &mut bytes).ok()?;
    Some(u64::from_le_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn core_register_ids_match_the_kernel_abi() {
        // arch/arm64/include/uapi/asm/kvm.h: KVM_REG_ARM_CORE_REG(regs.pc) etc.
        assert_eq!(x_reg(0), 0x6030_0000_0010_0000);
        assert_eq!(x_reg(1), 0x6030_0000_0010_0002);
        assert_eq!(pc_reg(), 0x6030_0000_0010_0040);
        assert_eq!(pstate_reg(), 0x6030_0000_0010_0042);
    }
}
