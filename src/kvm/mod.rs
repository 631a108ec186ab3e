//! KVM ownership: the VM (memory slots, irqchip, PIT) and the vCPUs with their run loops.
//!
//! Imports `arch` for register and CPUID setup and `devices::bus` to dispatch exits; never the
//! API or the VMM's lifecycle.

pub mod state;
pub mod vcpu;
pub mod vm;

/// What kind of virtualization backs `/dev/kvm` on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostKind {
    /// VT-x or AMD-V: guest code runs natively.
    HardwareVirt,
    /// KVM's PVM module (pagetable-based virtualization): a guest kernel that is not
    /// PVM-enlightened runs inside KVM's instruction emulator.
    Pvm,
}

impl HostKind {
    /// Detects the host kind from the loaded KVM modules.
    pub fn detect() -> HostKind {
        if std::path::Path::new("/sys/module/kvm_pvm").exists() {
            HostKind::Pvm
        } else {
            HostKind::HardwareVirt
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            HostKind::HardwareVirt => "hardware virtualization",
            HostKind::Pvm => "PVM (guest kernel code runs in KVM's instruction emulator)",
        }
    }
}
