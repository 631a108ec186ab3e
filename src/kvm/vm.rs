//! The KVM VM: `/dev/kvm`, the VM fd, guest memory slots, in-kernel irqchip and PIT.

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::current::cpuid;
use crate::arch::current::layout::KVM_TSS_ADDRESS;

const KVM_API_VERSION: i32 = 12;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm (is KVM available and accessible to this user?)")]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("unsupported KVM API version {0} (expected {KVM_API_VERSION})")]
    ApiVersion(i32),
    #[error("cannot create the KVM VM")]
    CreateVm(#[source] kvm_ioctls::Error),
    #[error("cannot set up the VM's {0}")]
    Setup(&'static str, #[source] kvm_ioctls::Error),
    #[error("cannot register guest memory with KVM")]
    Memory(#[source] kvm_ioctls::Error),
    #[error("KVM supports at most {max} vCPUs on this host, {requested} requested")]
    TooManyVcpus { requested: u8, max: usize },
    #[error("cannot create vCPU {0}")]
    CreateVcpu(u8, #[source] kvm_ioctls::Error),
}

/// An open KVM VM with its irqchip.
#[derive(Debug)]
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
}

impl Vm {
    /// Opens `/dev/kvm` and creates an empty VM.
    pub fn new() -> Result<Vm, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let version = kvm.get_api_version();
        if version != KVM_API_VERSION {
            return Err(VmError::ApiVersion(version));
        }
        let fd = kvm.create_vm().map_err(VmError::CreateVm)?;
        Ok(Vm { kvm, fd })
    }

    /// Adds the TSS, the in-kernel irqchip and the PIT. Call after [`Vm::register_memory`]:
    /// installing memory slots is several times slower on some hosts once an irqchip exists.
    pub fn create_irqchip(&self) -> Result<(), VmError> {
        let fd = &self.fd;
        fd.set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(|e| VmError::Setup("TSS", e))?;
        fd.create_irq_chip()
            .map_err(|e| VmError::Setup("irqchip", e))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(|e| VmError::Setup("PIT", e))?;
        Ok(())
    }

    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Checks the vCPU count against what KVM allows.
    pub fn check_vcpu_count(&self, requested: u8) -> Result<(), VmError> {
        let max = self.kvm.get_max_vcpus();
        if usize::from(requested) > max {
            return Err(VmError::TooManyVcpus { requested, max });
        }
        Ok(())
    }

    /// KVM's supported CPUID for this host, plus the TSC-deadline timer when KVM emulates it
    /// (KVM leaves that bit for the VMM to set).
    pub fn supported_cpuid(&self) -> Result<CpuId, VmError> {
        let mut supported = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| VmError::Setup("CPUID", e))?;
        if self.kvm.check_extension(Cap::TscDeadlineTimer) {
            cpuid::add_tsc_deadline(supported.as_mut_slice());
        }
        Ok(supported)
    }

    /// Registers every region of `mem` as a KVM memory slot.
    pub fn register_memory(&self, mem: &GuestMemoryMmap) -> Result<(), VmError> {
        for (slot, region) in mem.iter().enumerate() {
            let host = region.as_ptr() as u64;
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host,
                flags: 0,
            };
            // SAFETY: the region describes a live mapping owned by `mem`, which the caller keeps
            // alive (and never unmaps) for as long as the VM exists.
            unsafe { self.fd.set_user_memory_region(region) }.map_err(VmError::Memory)?;
        }
        Ok(())
    }

    /// Wires `evt` to interrupt line `gsi`.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(|e| VmError::Setup("irqfd", e))
    }

    /// Creates vCPU `index`.
    pub fn create_vcpu(&self, index: u8) -> Result<kvm_ioctls::VcpuFd, VmError> {
        self.fd
            .create_vcpu(u64::from(index))
            .map_err(|e| VmError::CreateVcpu(index, e))
    }
}

impl Vm {
    /// Signals `evt` when the guest writes the 32-bit value `datamatch` at MMIO `addr`.
    pub fn register_mmio_notify(
        &self,
        evt: &EventFd,
        addr: u64,
        datamatch: u32,
    ) -> Result<(), VmError> {
        let addr = kvm_ioctls::IoEventAddress::Mmio(addr);
        self.fd
            .register_ioevent(evt, &addr, datamatch)
            .map_err(|e| VmError::Setup("ioeventfd", e))
    }
}

impl Vm {
    /// MSR indices KVM knows on this host, to try when saving vCPU state.
    pub fn msr_candidates(&self) -> Result<Vec<u32>, crate::kvm::state::StateError> {
        crate::kvm::state::msr_candidates(&self.kvm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn supported_cpuid_has_tsc_deadline_when_kvm_emulates_it() {
        if !std::path::Path::new("/dev/kvm").exists() {
            eprintln!("skipping: /dev/kvm is missing");
            return;
        }
        let vm = Vm::new().unwrap();
        let cap = vm.kvm.check_extension(Cap::TscDeadlineTimer);
        let supported = vm.supported_cpuid().unwrap();
        let leaf1 = supported
            .as_slice()
            .iter()
            .find(|e| e.function == 1)
            .expect("leaf 1");
        if cap {
            assert_ne!(leaf1.ecx & cpuid::LEAF1_ECX_TSC_DEADLINE, 0);
        }
    }
}
