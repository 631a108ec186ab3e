//! virtio devices on the virtio-mmio transport.
//!
//! Register accesses arrive on a vCPU thread through [`mmio::MmioTransport`]; queue notifications
//! (ioeventfds) and device activation are handled on the VMM thread by [`VirtioSlot`], the
//! event-loop subscriber of one device. When the guest sets DRIVER_OK the transport only signals
//! an eventfd; the VMM thread then activates the device, so no device work runs on a vCPU thread.

pub mod balloon;
pub mod block;
pub mod mmio;
pub mod net;
pub mod rng;
pub mod vsock;

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use crate::memory::GuestMemoryMmap;
use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::Queue;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::bus::lock;
use crate::config::VmConfig;
use crate::metrics::Sample;

/// Feature bit every modern device offers.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// InterruptStatus bit: a used buffer was added.
pub const INT_VRING: u32 = 1;
/// InterruptStatus bit: the configuration changed.
pub const INT_CONFIG: u32 = 2;

/// Device type ids (virtio spec 5).
pub const TYPE_NET: u32 = 1;
pub const TYPE_BLOCK: u32 = 2;

/// The interrupt line of one device: the status bits the guest reads and the irqfd that raises
/// the line.
#[derive(Debug)]
pub struct Interrupt {
    pub status: AtomicU32,
    irqfd: EventFd,
}

impl Interrupt {
    pub fn new(irqfd: EventFd) -> Self {
        Interrupt {
            status: AtomicU32::new(0),
            irqfd,
        }
    }

    /// Sets `bits` in InterruptStatus and raises the line.
    pub fn raise(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
        if let Err(e) = self.irqfd.write(1) {
            crate::warn_limited!("cannot raise a virtio interrupt: {e}");
        }
    }
}

/// Why a device could not be activated.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ActivateError {
    #[error("expected {expected} queues, the driver set up {found}")]
    QueueCount { expected: usize, found: usize },
    #[error("queue {0} is not valid in guest memory")]
    BadQueue(usize),
}

/// Why a device could not be opened, updated or restored.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Block(#[from] block::BlockError),
    #[error(transparent)]
    Tap(#[from] crate::devices::tap::TapError),
    #[error(transparent)]
    Balloon(#[from] balloon::BalloonError),
    #[error("cannot create a rate-limiter timer")]
    Timer(#[source] std::io::Error),
    #[error("cannot listen on uds_path {0}")]
    VsockListen(String, #[source] std::io::Error),
    #[error("cannot create an epoll instance")]
    Epoll(#[source] std::io::Error),
    #[error("this update does not apply to a {0} device")]
    WrongUpdate(&'static str),
    #[error("a {0} device has no report")]
    NoReport(&'static str),
    #[error("invalid saved {0} state: {1}")]
    SavedState(&'static str, String),
    #[error("{noun} {id}")]
    Of {
        noun: &'static str,
        id: String,
        #[source]
        source: Box<DeviceError>,
    },
}

impl DeviceError {
    /// Whether the host rather than the request is at fault.
    pub fn is_internal(&self) -> bool {
        match self {
            DeviceError::Timer(_) | DeviceError::Epoll(_) => true,
            DeviceError::Balloon(e) => e.is_internal(),
            DeviceError::Of { source, .. } => source.is_internal(),
            _ => false,
        }
    }

    /// The error, naming the device it happened to (`drive rootfs: ...`).
    pub fn of(self, noun: &'static str, id: &str) -> DeviceError {
        DeviceError::Of {
            noun,
            id: id.to_string(),
            source: Box::new(self),
        }
    }
}

/// What a device receives when the driver sets DRIVER_OK.
#[derive(Debug)]
pub struct Activation {
    pub mem: GuestMemoryMmap,
    pub queues: Vec<Queue>,
    pub acked_features: u64,
    pub interrupt: Arc<Interrupt>,
}

/// A device's configuration space, shared with its transport: vCPU threads read it without
/// taking the device's lock (which the VMM thread holds across host I/O). Guest writes land only
/// in the device's writable byte range (the balloon's `actual`); elsewhere they are ignored.
#[derive(Debug, Default)]
pub struct ConfigSpace {
    bytes: Mutex<Vec<u8>>,
    writable: std::ops::Range<usize>,
}

impl ConfigSpace {
    pub fn new(bytes: Vec<u8>) -> Arc<Self> {
        Self::with_writable(bytes, 0..0)
    }

    /// A configuration space whose bytes in `writable` the driver may write.
    pub fn with_writable(bytes: Vec<u8>, writable: std::ops::Range<usize>) -> Arc<Self> {
        Arc::new(ConfigSpace {
            bytes: Mutex::new(bytes),
            writable,
        })
    }

    /// Copies the bytes at `offset` into `data`; bytes past the end read as zero.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let config = lock(&self.bytes);
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        if start < config.len() {
            let n = data.len().min(config.len() - start);
            data[..n].copy_from_slice(&config[start..start + n]);
        }
    }

    /// A driver's write at `offset`: applied only if it lies within the writable range.
    pub fn write(&self, offset: u64, data: &[u8]) -> bool {
        let Ok(start) = usize::try_from(offset) else {
            return false;
        };
        let Some(end) = start.checked_add(data.len()) else {
            return false;
        };
        if start < self.writable.start || end > self.writable.end {
            return false;
        }
        let mut config = lock(&self.bytes);
        if end > config.len() {
            return false;
        }
        config[start..end].copy_from_slice(data);
        true
    }

    /// Replaces the contents (the device's configuration changed).
    pub fn replace(&self, bytes: Vec<u8>) {
        *lock(&self.bytes) = bytes;
    }

    /// A copy of the contents.
    pub fn bytes(&self) -> Vec<u8> {
        lock(&self.bytes).clone()
    }
}

/// A runtime change asked of a device (`PATCH /drives`, `PATCH /network-interfaces`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceUpdate {
    Drive(crate::control::DriveUpdate),
    Net(crate::control::NetUpdate),
    Balloon(balloon::BalloonChange),
}

/// A virtio device's own behaviour; the transport does the rest.
pub trait VirtioDevice: Send {
    /// virtio device type id.
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// How many of the queues (the first ones) a driver that acknowledged `acked_features`
    /// sets up; the transport activates the device with those.
    fn queues_in_use(&self, _acked_features: u64) -> usize {
        self.queue_max_sizes().len()
    }
    /// Features offered to the driver.
    fn features(&self) -> u64;
    /// The device configuration space, shared with the transport.
    fn config_space(&self) -> Arc<ConfigSpace>;
    /// Starts the device with the driver's queues. Runs on the VMM thread.
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError>;
    /// Whether the device is running.
    fn is_active(&self) -> bool;
    /// Stops the device and forgets its queues (driver reset). Runs on the VMM thread.
    fn reset(&mut self);
    /// Processes queue `index` after the driver notified it. Runs on the VMM thread.
    fn process_queue(&mut self, index: usize);
    /// The live state of the device's queues while active (for snapshots); empty otherwise.
    fn queue_states(&self) -> Vec<virtio_queue::QueueState>;
    /// Other fds the device needs watched on the VMM thread (a TAP, rate-limiter timers), with
    /// the events to watch. Asked once, when the device is added to the event loop.
    fn event_fds(&self) -> Vec<(RawFd, EventSet)> {
        Vec::new()
    }
    /// One of [`VirtioDevice::event_fds`] is ready.
    fn process_fd(&mut self, _fd: RawFd) {}
    /// What reopening the device in another process needs (its backing and settings), in the
    /// device's own saved form.
    fn saved_config(&self) -> serde_json::Value;
    /// Device state beyond its queues (a frame in flight, rate-limiter budgets), for snapshots.
    fn save_state(&self) -> serde_json::Value;
    /// Applies what [`VirtioDevice::save_state`] captured.
    fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), DeviceError>;
    /// The device's counters, labelled by the registry with its id.
    fn metrics(&self, out: &mut Vec<Sample>);
    /// Applies a runtime update; `Ok(true)` when the guest must be told its configuration changed.
    fn update(&mut self, update: &DeviceUpdate) -> Result<bool, DeviceError>;
    /// What the device reports about itself at run time (the balloon's statistics).
    fn report(&self) -> Result<serde_json::Value, DeviceError> {
        Err(DeviceError::NoReport("virtio"))
    }
}

/// A device opened from its configuration, ready to be attached to a VM.
pub struct NewDevice {
    pub id: String,
    pub device: SharedVirtioDevice,
    /// Kernel command line entries the device needs (`root=` for a root drive).
    pub cmdline: Vec<String>,
}

impl std::fmt::Debug for NewDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NewDevice")
            .field("id", &self.id)
            .field("cmdline", &self.cmdline)
            .finish_non_exhaustive()
    }
}

/// Host resources given to devices as they open: snapshot-load retargeting to other host
/// resources, and the shared MMDS store.
#[derive(Debug, Default, Clone, Copy)]
pub struct Overrides<'a> {
    /// `(iface_id, host_dev_name)`: attach the interface to another TAP.
    pub taps: &'a [(String, String)],
    /// `vsock_override.uds_path`: the vsock device listens there instead.
    pub vsock_uds_path: Option<&'a str>,
    /// The MMDS data store, for the interfaces MMDS is enabled on.
    pub mmds: Option<&'a crate::mmds::SharedMmds>,
}

/// What a kind of virtio device provides to the VMM's device registry. Each kind describes
/// itself in its own file; [`KINDS`] lists them.
#[derive(Debug)]
pub struct DeviceKind {
    /// Short name, also the tag of its entries in snapshots ("block").
    pub name: &'static str,
    /// What one device is called in messages ("drive", "network interface").
    pub noun: &'static str,
    /// The metrics label that carries a device's id ("drive", "iface").
    pub id_label: &'static str,
    /// Opens the devices `config` asks for (files, TAPs), in slot order, before the VM exists.
    pub open: fn(&VmConfig, Overrides<'_>) -> Result<Vec<NewDevice>, DeviceError>,
    /// Reopens one device from its [`VirtioDevice::saved_config`].
    pub reopen: fn(&serde_json::Value, Overrides<'_>) -> Result<NewDevice, DeviceError>,
    /// Writes a saved device's settings into `config` (replacing an entry with its id).
    pub describe: fn(&serde_json::Value, &mut VmConfig) -> Result<(), DeviceError>,
}

/// Every kind of virtio device, in the order their devices take slots.
pub const KINDS: &[&DeviceKind] = &[
    &block::KIND,
    &net::KIND,
    &rng::KIND,
    &vsock::KIND,
    &balloon::KIND,
];

/// Decodes a device's saved form, naming the kind on failure.
pub fn from_saved<T: serde::de::DeserializeOwned>(
    kind: &'static str,
    value: &serde_json::Value,
) -> Result<T, DeviceError> {
    T::deserialize(value).map_err(|e| DeviceError::SavedState(kind, e.to_string()))
}

/// Encodes a device's saved form.
pub fn to_saved<T: serde::Serialize>(value: &T) -> serde_json::Value {
    serde_json::to_value(value).unwrap_or(serde_json::Value::Null)
}

/// A device shared between its transport and its event-loop subscriber.
pub type SharedVirtioDevice = Arc<Mutex<dyn VirtioDevice>>;

/// Event-loop subscriber of one virtio-mmio slot: activation requests and queue notifications.
pub struct VirtioSlot {
    transport: Arc<Mutex<mmio::MmioTransport>>,
    device: SharedVirtioDevice,
    activate_evt: EventFd,
    /// The transport's flag for a pending reset or activation.
    sync_requested: Arc<std::sync::atomic::AtomicBool>,
    queue_evts: Vec<EventFd>,
}

impl std::fmt::Debug for VirtioSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioSlot")
            .field("queues", &self.queue_evts.len())
            .finish_non_exhaustive()
    }
}

impl VirtioSlot {
    pub fn new(
        transport: Arc<Mutex<mmio::MmioTransport>>,
        device: SharedVirtioDevice,
        activate_evt: EventFd,
        queue_evts: Vec<EventFd>,
    ) -> Self {
        let sync_requested = lock(&transport).sync_requested();
        VirtioSlot {
            transport,
            device,
            activate_evt,
            sync_requested,
            queue_evts,
        }
    }

    /// Carries out what the transport asked for (reset, activation).
    fn sync(&mut self) {
        self.sync_requested.store(false, Ordering::Release);
        let mut transport = lock(&self.transport);
        if let Err(e) = transport.sync_device() {
            crate::warn_limited!("virtio device activation failed: {e}");
        }
    }
}

impl MutEventSubscriber for VirtioSlot {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.activate_evt.as_raw_fd() {
            let _ = self.activate_evt.read();
            self.sync();
            return;
        }
        if let Some(index) = self.queue_evts.iter().position(|e| e.as_raw_fd() == fd) {
            let _ = self.queue_evts[index].read();
            // A reset or activation the driver asked for comes before its later notifications.
            if self.sync_requested.load(Ordering::Acquire) {
                self.sync();
            }
            let mut device = lock(&self.device);
            if device.is_active() {
                device.process_queue(index);
            }
            return;
        }
        // Host-side events too: a device the driver already started must see itself active.
        if self.sync_requested.load(Ordering::Acquire) {
            self.sync();
        }
        lock(&self.device).process_fd(fd);
    }

    fn init(&mut self, ops: &mut EventOps) {
        let fds = std::iter::once(&self.activate_evt).chain(self.queue_evts.iter());
        for evt in fds {
            if let Err(e) = ops.add(Events::new(evt, EventSet::IN)) {
                tracing::error!("cannot watch a virtio eventfd: {e:?}");
            }
        }
        for (fd, set) in lock(&self.device).event_fds() {
            if let Err(e) = ops.add(Events::new_raw(fd, set)) {
                tracing::error!("cannot watch a device fd: {e:?}");
            }
        }
    }
}
