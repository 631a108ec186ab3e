//! Emulated devices and the address-range bus the vCPUs reach them through.
//!
//! Devices never import the API, the VMM or KVM: they see register accesses (on a vCPU thread) and
//! fds or triggers handed to them at construction. Legacy devices live here; virtio ones under
//! `virtio/`.

pub mod boot_timer;
pub mod bus;
pub mod i8042;
pub mod legacy;
pub mod rate_limiter;
pub mod rtc;
pub mod tap;
pub mod virtio;

use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

/// An eventfd that devices signal (an interrupt line wired through irqfd, or a VMM event).
#[derive(Debug)]
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

impl EventFdTrigger {
    pub fn try_clone(&self) -> std::io::Result<Self> {
        Ok(EventFdTrigger(self.0.try_clone()?))
    }
}
