//! What a snapshot's state file holds.

use serde::{Deserialize, Serialize};

use crate::config::{CpuProfile, VmConfig};
use crate::devices::legacy::SerialSnapshot;
use crate::devices::virtio::mmio::TransportSnapshot;
use crate::kvm::state::{VcpuState, VmState};

/// A paused VM, minus its RAM (which is in the memory file).
#[derive(Debug, Serialize, Deserialize)]
pub struct VmSnapshot {
    /// Ties the state file to its memory file.
    pub snapshot_id: u64,
    /// The configuration the VM was built from (drives are reopened from it).
    pub config: VmConfig,
    /// Guest RAM ranges `(start, size)`, stored back to back in the memory file.
    pub ram: Vec<(u64, u64)>,
    pub cpu_profile: CpuProfile,
    pub kvm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub serial: SerialSnapshot,
    /// virtio-blk transports in slot order, with their drive ids.
    pub drives: Vec<(String, TransportSnapshot)>,
    /// virtio-net transports in slot order (after the drives), with their interface ids.
    #[serde(default)]
    pub nets: Vec<(String, TransportSnapshot)>,
}

impl VmSnapshot {
    pub fn ram_bytes(&self) -> u64 {
        self.ram.iter().map(|r| r.1).sum()
    }
}
