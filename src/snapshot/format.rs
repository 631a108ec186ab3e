//! What a snapshot's state file holds (format version [`super::FORMAT_VERSION`]): flick's own
//! types, not the API's, so renaming an API field or bumping a crate cannot change the file
//! without this module and the version changing too. Architecture state is in the
//! architecture's own saved form ([`crate::arch::Arch::VcpuState`]).

use serde::{Deserialize, Serialize};

use crate::arch::{Arch, Current};
use crate::config::{BootSourceConfig, CpuProfile, MachineConfig, VmConfig};
use crate::devices::legacy::SerialSnapshot;
use crate::devices::virtio::mmio::TransportSnapshot;

/// The machine's shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedMachine {
    pub vcpu_count: u8,
    pub mem_size_mib: usize,
    pub smt: bool,
    /// The CPU model the vCPUs were given: `true` for the conservative profile.
    pub conservative_cpu: bool,
}

/// What the guest was booted from (reported by `GET /vm/config` after a load).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedBoot {
    pub kernel: String,
    pub args: Option<String>,
    pub initrd: Option<String>,
}

/// One virtio device: its kind and id, settings to reopen it, transport and device state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedDevice {
    pub kind: String,
    pub id: String,
    /// The device kind's own saved settings.
    pub config: serde_json::Value,
    pub transport: TransportSnapshot,
    /// The device's own state beyond its queues.
    pub state: serde_json::Value,
}

/// A paused VM, minus its RAM (which is in the memory file).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSnapshot {
    /// Ties the state file to its memory file.
    pub snapshot_id: u64,
    /// The architecture the state was captured on.
    pub arch: String,
    pub machine: SavedMachine,
    pub boot: Option<SavedBoot>,
    /// Guest RAM ranges `(start, size)`, stored back to back in the memory file.
    pub ram: Vec<(u64, u64)>,
    pub vm: <Current as Arch>::VmState,
    pub vcpus: Vec<<Current as Arch>::VcpuState>,
    pub serial: SerialSnapshot,
    /// Every virtio device in slot order.
    pub devices: Vec<SavedDevice>,
}

impl VmSnapshot {
    /// Total RAM bytes; `None` when the saved sizes overflow (a corrupt or hostile file).
    pub fn ram_bytes(&self) -> Option<u64> {
        self.ram
            .iter()
            .try_fold(0u64, |sum, r| sum.checked_add(r.1))
    }

    /// The CPU profile the vCPUs were given.
    pub fn cpu_profile(&self) -> CpuProfile {
        if self.machine.conservative_cpu {
            CpuProfile::Conservative
        } else {
            CpuProfile::Host
        }
    }

    /// The configuration `GET /vm/config` reports for the restored VM, before its devices.
    pub fn base_config(&self) -> VmConfig {
        VmConfig {
            machine_config: MachineConfig {
                vcpu_count: self.machine.vcpu_count,
                mem_size_mib: self.machine.mem_size_mib,
                smt: self.machine.smt,
                cpu_profile: self.cpu_profile(),
                ..MachineConfig::default()
            },
            boot_source: self.boot.as_ref().map(|b| BootSourceConfig {
                kernel_image_path: b.kernel.clone(),
                boot_args: b.args.clone(),
                initrd_path: b.initrd.clone(),
            }),
            ..VmConfig::default()
        }
    }
}

/// The machine and boot parts of `config`, as saved.
pub fn saved_machine(config: &VmConfig, profile: CpuProfile) -> (SavedMachine, Option<SavedBoot>) {
    let mc = &config.machine_config;
    let machine = SavedMachine {
        vcpu_count: mc.vcpu_count,
        mem_size_mib: mc.mem_size_mib,
        smt: mc.smt,
        conservative_cpu: profile == CpuProfile::Conservative,
    };
    let boot = config.boot_source.as_ref().map(|b| SavedBoot {
        kernel: b.kernel_image_path.clone(),
        args: b.boot_args.clone(),
        initrd: b.initrd_path.clone(),
    });
    (machine, boot)
}
