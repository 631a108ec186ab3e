//! The KVM VM: `/dev/kvm`, the VM fd, guest memory slots, irqfds and ioeventfds. What the
//! interrupt controller is, is the architecture's business ([`crate::arch::Arch::setup_vm`]).

use crate::memory::GuestMemoryMmap;
use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

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
    #[error("cannot read KVM's dirty-page log of memory slot {0}")]
    DirtyLog(u32, #[source] kvm_ioctls::Error),
    #[error("guest memory has too many regions for KVM")]
    TooManySlots,
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

    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// Checks the vCPU count against what KVM allows.
    pub fn check_vcpu_count(&self, requested: u8) -> Result<(), VmError> {
        let max = self.kvm.get_max_vcpus();
        if usize::from(requested) > max {
            return Err(VmError::TooManyVcpus { requested, max });
        }
        Ok(())
    }

    /// Registers every region of `mem` as a KVM memory slot (slot n = region n); with
    /// `track_dirty`, KVM logs the pages the guest writes (`KVM_MEM_LOG_DIRTY_PAGES`).
    pub fn register_memory(&self, mem: &GuestMemoryMmap, track_dirty: bool) -> Result<(), VmError> {
        let flags = if track_dirty {
            KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        };
        for (slot, region) in mem.iter().enumerate() {
            let host = region.as_ptr() as u64;
            let region = kvm_userspace_memory_region {
                slot: u32::try_from(slot).map_err(|_| VmError::TooManySlots)?,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host,
                flags,
            };
            // SAFETY: the region describes a live mapping owned by `mem`, which the caller keeps
            // alive (and never unmaps) for as long as the VM exists.
            unsafe { self.fd.set_user_memory_region(region) }.map_err(VmError::Memory)?;
        }
        Ok(())
    }

    /// Moves KVM's dirty-page log of every slot (pages the guest wrote since the last call)
    /// into the regions' own bitmaps and clears KVM's; the memory must have been registered
    /// with `track_dirty`.
    pub fn collect_dirty_log(&self, mem: &GuestMemoryMmap) -> Result<(), VmError> {
        for (slot, region) in mem.iter().enumerate() {
            let slot = u32::try_from(slot).map_err(|_| VmError::TooManySlots)?;
            let len = usize::try_from(region.len()).map_err(|_| VmError::TooManySlots)?;
            let log = self
                .fd
                .get_dirty_log(slot, len)
                .map_err(|e| VmError::DirtyLog(slot, e))?;
            crate::memory::mark_pages(region, &log);
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
