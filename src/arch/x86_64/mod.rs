//! x86_64 guest setup.

pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod regs;
pub mod zeropage;
