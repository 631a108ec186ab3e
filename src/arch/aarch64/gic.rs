//! The in-kernel GICv3 (`KVM_CREATE_DEVICE`): distributor and redistributor addresses, the
//! number of interrupt IDs, and its initialisation, which KVM accepts only once every vCPU
//! exists and which irqfds need. With it, when KVM offers one, the GICv3 ITS (the translation
//! service that turns MSIs into LPIs), created before the GIC is initialised so that the
//! redistributors support LPIs.

use kvm_bindings::{
    kvm_create_device, kvm_device_attr, kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_ITS,
    kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V3, KVM_CREATE_DEVICE_TEST, KVM_DEV_ARM_VGIC_CTRL_INIT,
    KVM_DEV_ARM_VGIC_GRP_ADDR, KVM_DEV_ARM_VGIC_GRP_CTRL, KVM_DEV_ARM_VGIC_GRP_NR_IRQS,
    KVM_VGIC_ITS_ADDR_TYPE, KVM_VGIC_V3_ADDR_TYPE_DIST, KVM_VGIC_V3_ADDR_TYPE_REDIST,
};
use std::os::fd::AsRawFd;
use std::sync::Mutex;

use kvm_ioctls::{DeviceFd, VmFd};

use super::layout::{gic_its_start, gic_redist_start, GIC_DIST_START, GIC_NR_IRQS};
use crate::arch::ArchError;

fn set_attr(gic: &DeviceFd, group: u32, attr: u32, addr: u64, what: &str) -> Result<(), ArchError> {
    let attr = kvm_device_attr {
        flags: 0,
        group,
        attr: u64::from(attr),
        addr,
    };
    gic.set_device_attr(&attr)
        .map_err(|e| ArchError::Kvm(format!("set up the GICv3: {what}"), e))
}

/// The in-kernel interrupt controller of a VM.
pub struct Gic {
    pub gic: DeviceFd,
    /// The ITS, when KVM offers one.
    pub its: Option<DeviceFd>,
    pub vcpus: u8,
}

impl std::fmt::Debug for Gic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gic")
            .field("its", &self.its.is_some())
            .field("vcpus", &self.vcpus)
            .finish_non_exhaustive()
    }
}

/// The GIC of this process's VM, with the VM fd's number. KVM offers no way back from a VM fd
/// to a device it holds, and the architecture interface keeps no state, so snapshots find the
/// GIC here (flick runs one VM per process).
static GIC: Mutex<Option<(i32, Gic)>> = Mutex::new(None);

/// Runs `f` with the GIC of `vm`.
pub fn with_gic<T>(
    vm: &VmFd,
    f: impl FnOnce(&Gic) -> Result<T, ArchError>,
) -> Result<T, ArchError> {
    let guard = GIC.lock().unwrap_or_else(|p| p.into_inner());
    match guard.as_ref() {
        Some((fd, gic)) if *fd == vm.as_raw_fd() => f(gic),
        _ => Err(ArchError::SavedState("GICv3: this VM has none")),
    }
}

/// A `KVM_CREATE_DEVICE` request for an ITS.
fn its_request(flags: u32) -> kvm_create_device {
    kvm_create_device {
        type_: kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_ITS,
        fd: 0,
        flags,
    }
}

/// Whether KVM can create an ITS for this VM (a test creation, which makes no device).
fn its_available(vm: &VmFd) -> bool {
    vm.create_device(&mut its_request(KVM_CREATE_DEVICE_TEST))
        .is_ok()
}

/// Creates the ITS at its place below the redistributors and initialises it.
fn create_its(vm: &VmFd, vcpus: u8) -> Result<DeviceFd, ArchError> {
    let mut device = its_request(0);
    let its = vm
        .create_device(&mut device)
        .map_err(crate::arch::kvm_error("create the in-kernel GICv3 ITS"))?;
    let base: u64 = gic_its_start(vcpus);
    set_attr(
        &its,
        KVM_DEV_ARM_VGIC_GRP_ADDR,
        KVM_VGIC_ITS_ADDR_TYPE,
        std::ptr::addr_of!(base) as u64,
        "ITS address",
    )?;
    set_attr(
        &its,
        KVM_DEV_ARM_VGIC_GRP_CTRL,
        KVM_DEV_ARM_VGIC_CTRL_INIT,
        0,
        "ITS initialisation",
    )?;
    Ok(its)
}

/// Whether the VM's GIC has an ITS (for the device tree, built after the GIC).
pub fn has_its(vm: &VmFd) -> bool {
    with_gic(vm, |gic| Ok(gic.its.is_some())).unwrap_or(false)
}

/// Creates and initialises the vGICv3 for `vcpus` vCPUs, all of them already created.
pub fn create(vm: &VmFd, vcpus: u8) -> Result<(), ArchError> {
    let mut device = kvm_create_device {
        type_: kvm_device_type_KVM_DEV_TYPE_ARM_VGIC_V3,
        fd: 0,
        flags: 0,
    };
    let gic = vm
        .create_device(&mut device)
        .map_err(crate::arch::kvm_error("create the in-kernel GICv3"))?;
    let dist: u64 = GIC_DIST_START;
    let redist: u64 = gic_redist_start(vcpus);
    let nr_irqs: u32 = GIC_NR_IRQS;
    // The attributes point at these locals, which outlive each call.
    set_attr(
        &gic,
        KVM_DEV_ARM_VGIC_GRP_ADDR,
        KVM_VGIC_V3_ADDR_TYPE_DIST,
        std::ptr::addr_of!(dist) as u64,
        "distributor address",
    )?;
    set_attr(
        &gic,
        KVM_DEV_ARM_VGIC_GRP_ADDR,
        KVM_VGIC_V3_ADDR_TYPE_REDIST,
        std::ptr::addr_of!(redist) as u64,
        "redistributor address",
    )?;
    set_attr(
        &gic,
        KVM_DEV_ARM_VGIC_GRP_NR_IRQS,
        0,
        std::ptr::addr_of!(nr_irqs) as u64,
        "number of interrupts",
    )?;
    let its = if its_available(vm) {
        Some(create_its(vm, vcpus)?)
    } else {
        None
    };
    set_attr(
        &gic,
        KVM_DEV_ARM_VGIC_GRP_CTRL,
        KVM_DEV_ARM_VGIC_CTRL_INIT,
        0,
        "initialisation",
    )?;
    *GIC.lock().unwrap_or_else(|p| p.into_inner()) =
        Some((vm.as_raw_fd(), Gic { gic, its, vcpus }));
    Ok(())
}
