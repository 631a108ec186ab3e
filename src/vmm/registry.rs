//! The device registry: every virtio device of a VM with its id, kind and transport, in slot
//! order. Opening devices from the configuration, attaching them (MMIO slot, IRQ, ioeventfds,
//! command line), runtime updates, metrics and snapshot save/restore all go through here, the
//! same way for every kind; a kind's own behaviour is in its file under `devices::virtio`
//! (listed in [`KINDS`]). Runs on the VMM thread.

use std::sync::{Arc, Mutex};

use crate::memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::{Arch, Current};
use crate::config::VmConfig;
use crate::devices::bus::{lock, Bus, BusError};
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::{
    ActivateError, DeviceError, DeviceKind, DeviceUpdate, Interrupt, NewDevice, Overrides,
    SharedVirtioDevice, VirtioSlot, KINDS,
};
use crate::kvm::vm::{Vm, VmError};
use crate::metrics::Sample;
use crate::snapshot::format::SavedDevice;

/// Offset of QueueNotify in the virtio-mmio register file.
const QUEUE_NOTIFY: u64 = 0x50;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("unknown {noun} \"{id}\"")]
    Unknown { noun: &'static str, id: String },
    #[error("too many devices: no IRQ left for device {0}")]
    NoIrq(usize),
    #[error(transparent)]
    Kvm(#[from] VmError),
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("device layout conflict")]
    Bus(#[source] BusError),
    #[error("the snapshot has a device of unknown kind \"{0}\"")]
    UnknownKind(String),
    #[error("the snapshot's devices do not match its VM: {0}")]
    Mismatch(String),
    #[error("{noun} {id}: cannot restore its transport")]
    Restore {
        noun: &'static str,
        id: String,
        #[source]
        source: ActivateError,
    },
}

impl RegistryError {
    /// Whether the host rather than the request is at fault.
    pub fn is_internal(&self) -> bool {
        match self {
            RegistryError::Device(e) => e.is_internal(),
            RegistryError::Kvm(_) | RegistryError::EventFd(_) | RegistryError::Bus(_) => true,
            _ => false,
        }
    }
}

/// One attached virtio device.
pub struct DeviceEntry {
    pub kind: &'static DeviceKind,
    pub id: String,
    pub device: SharedVirtioDevice,
    pub transport: Arc<Mutex<MmioTransport>>,
}

impl std::fmt::Debug for DeviceEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceEntry")
            .field("kind", &self.kind.name)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// Devices opened (files, TAPs) but not yet attached to a VM, in slot order.
#[derive(Debug)]
pub struct Opened(Vec<(&'static DeviceKind, NewDevice)>);

impl Opened {
    /// Opens every device `config` asks for, kind by kind.
    pub fn from_config(config: &VmConfig, overrides: Overrides<'_>) -> Result<Opened, DeviceError> {
        let mut opened = Vec::new();
        for kind in KINDS {
            for device in (kind.open)(config, overrides)? {
                opened.push((*kind, device));
            }
        }
        Ok(Opened(opened))
    }

    /// Reopens the devices a snapshot saved, in their saved order.
    pub fn from_saved(
        saved: &[SavedDevice],
        overrides: Overrides<'_>,
    ) -> Result<Opened, RegistryError> {
        let mut opened = Vec::with_capacity(saved.len());
        for entry in saved {
            let kind = find_kind(&entry.kind)?;
            let device = (kind.reopen)(&entry.config, overrides)?;
            if device.id != entry.id {
                return Err(RegistryError::Mismatch(format!(
                    "{} \"{}\" is saved as \"{}\"",
                    kind.noun, device.id, entry.id
                )));
            }
            opened.push((kind, device));
        }
        Ok(Opened(opened))
    }
}

fn find_kind(name: &str) -> Result<&'static DeviceKind, RegistryError> {
    KINDS
        .iter()
        .copied()
        .find(|k| k.name == name)
        .ok_or_else(|| RegistryError::UnknownKind(name.to_string()))
}

/// Every attached virtio device.
#[derive(Default)]
pub struct Registry {
    pub entries: Vec<DeviceEntry>,
    /// Event-loop subscribers, taken by the VMM once the VM runs.
    pub slots: Vec<VirtioSlot>,
    /// `virtio_mmio.device=` and device entries (`root=`) for the kernel command line.
    pub cmdline: Vec<String>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("devices", &self.entries)
            .finish_non_exhaustive()
    }
}

fn eventfd() -> Result<EventFd, RegistryError> {
    EventFd::new(EFD_NONBLOCK).map_err(RegistryError::EventFd)
}

impl Registry {
    /// Puts every opened device in the next free slot: bus range, IRQ, notify ioeventfds,
    /// activation eventfd, command-line entries.
    pub fn attach(
        vm: &Vm,
        mem: &GuestMemoryMmap,
        mmio: &mut Bus,
        opened: Opened,
    ) -> Result<Registry, RegistryError> {
        let mut registry = Registry::default();
        for (index, (kind, new)) in opened.0.into_iter().enumerate() {
            let slot = Current::device_slot(index).ok_or(RegistryError::NoIrq(index))?;
            let irqfd = eventfd()?;
            vm.register_irqfd(&irqfd, slot.irq)?;
            let queue_count = lock(&new.device).queue_max_sizes().len();
            let mut queue_evts = Vec::with_capacity(queue_count);
            for queue in 0..queue_count {
                let evt = eventfd()?;
                let datamatch = u32::try_from(queue).unwrap_or(u32::MAX);
                vm.register_mmio_notify(&evt, slot.base + QUEUE_NOTIFY, datamatch)?;
                queue_evts.push(evt);
            }
            let activate = eventfd()?;
            let transport = Arc::new(Mutex::new(MmioTransport::new(
                new.device.clone(),
                mem.clone(),
                Arc::new(Interrupt::new(irqfd)),
                activate.try_clone().map_err(RegistryError::EventFd)?,
            )));
            mmio.insert(transport.clone(), slot.base, slot.size)
                .map_err(RegistryError::Bus)?;
            registry.slots.push(VirtioSlot::new(
                transport.clone(),
                new.device.clone(),
                activate,
                queue_evts,
            ));
            if Current::DEVICES_ON_CMDLINE {
                registry.cmdline.push(format!(
                    "virtio_mmio.device=4K@{:#x}:{}",
                    slot.base, slot.irq
                ));
            }
            registry.cmdline.extend(new.cmdline);
            registry.entries.push(DeviceEntry {
                kind,
                id: new.id,
                device: new.device,
                transport,
            });
        }
        Ok(registry)
    }

    fn find(&self, kind: &DeviceKind, id: &str) -> Result<&DeviceEntry, RegistryError> {
        self.entries
            .iter()
            .find(|e| e.kind.name == kind.name && e.id == id)
            .ok_or_else(|| RegistryError::Unknown {
                noun: kind.noun,
                id: id.to_string(),
            })
    }

    /// Applies a runtime update to device `id` of `kind`; tells the guest when its configuration
    /// changed. Writes the device's new settings into `config`.
    pub fn update(
        &self,
        kind: &DeviceKind,
        id: &str,
        update: &DeviceUpdate,
        config: &mut VmConfig,
    ) -> Result<(), RegistryError> {
        let entry = self.find(kind, id)?;
        let changed = lock(&entry.device)
            .update(update)
            .map_err(|e| e.of(kind.noun, id))?;
        if changed {
            lock(&entry.transport).notify_config_change();
        }
        let saved = lock(&entry.device).saved_config();
        (kind.describe)(&saved, config)?;
        Ok(())
    }

    /// What device `id` of `kind` reports about itself (the balloon's statistics).
    pub fn report(&self, kind: &DeviceKind, id: &str) -> Result<serde_json::Value, RegistryError> {
        let entry = self.find(kind, id)?;
        let report = lock(&entry.device).report()?;
        Ok(report)
    }

    /// Every device's metric samples, labelled with its id.
    pub fn samples(&self, out: &mut Vec<Sample>) {
        for entry in &self.entries {
            let mut own = Vec::new();
            lock(&entry.device).metrics(&mut own);
            out.extend(
                own.into_iter()
                    .map(|s| s.labelled(entry.kind.id_label, &entry.id)),
            );
        }
    }

    /// Every device's settings, transport and state, for a snapshot.
    pub fn save(&self) -> Vec<SavedDevice> {
        self.entries
            .iter()
            .map(|entry| {
                let (config, state) = {
                    let device = lock(&entry.device);
                    (device.saved_config(), device.save_state())
                };
                SavedDevice {
                    kind: entry.kind.name.to_string(),
                    id: entry.id.clone(),
                    config,
                    transport: lock(&entry.transport).snapshot(),
                    state,
                }
            })
            .collect()
    }

    /// Restores transports and device state from a snapshot (devices reopened from the same
    /// list), then lets active devices process requests queued just before the snapshot.
    pub fn restore(&self, saved: &[SavedDevice]) -> Result<(), RegistryError> {
        if saved.len() != self.entries.len() {
            return Err(RegistryError::Mismatch(format!(
                "{} saved devices for {} attached",
                saved.len(),
                self.entries.len()
            )));
        }
        for (entry, saved) in self.entries.iter().zip(saved) {
            let (noun, id) = (entry.kind.noun, &entry.id);
            lock(&entry.device)
                .restore_state(&saved.state)
                .map_err(|e| e.of(noun, id))?;
            lock(&entry.transport)
                .restore(&saved.transport)
                .map_err(|source| RegistryError::Restore {
                    noun,
                    id: id.clone(),
                    source,
                })?;
            let mut device = lock(&entry.device);
            if device.is_active() {
                for queue in 0..device.queue_max_sizes().len() {
                    device.process_queue(queue);
                }
            }
        }
        Ok(())
    }

    /// Writes every device's settings into `config` (after a snapshot load).
    pub fn describe(&self, config: &mut VmConfig) -> Result<(), RegistryError> {
        for entry in &self.entries {
            let saved = lock(&entry.device).saved_config();
            (entry.kind.describe)(&saved, config)?;
        }
        Ok(())
    }
}
