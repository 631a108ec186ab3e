//! Architecture-specific guest setup: memory map, boot structures, vCPU registers and CPU model.
//!
//! Pure data and KVM ioctls on a vCPU or VM handed in by the caller; nothing here owns threads or
//! devices. Only x86_64 is implemented; the rest of the crate reaches it through this module so an
//! aarch64 sibling can slot in beside it.

#[cfg(target_arch = "x86_64")]
pub mod x86_64;
#[cfg(target_arch = "x86_64")]
pub use x86_64 as current;
