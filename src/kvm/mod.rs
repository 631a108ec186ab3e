//! KVM ownership: the VM (memory slots, irqfds, ioeventfds) and the vCPU threads with their
//! architecture-independent run loop.
//!
//! Imports `arch` (through [`crate::arch::Current`]) for everything architecture-specific and
//! `devices::bus` to dispatch exits; never the API or the VMM's lifecycle.

pub mod vcpu;
pub mod vm;
