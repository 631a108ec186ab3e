//! virtio devices on the virtio-mmio transport.
//!
//! Register accesses arrive on a vCPU thread through [`mmio::MmioTransport`]; queue notifications
//! (ioeventfds) and device activation are handled on the VMM thread by [`VirtioSlot`], the
//! event-loop subscriber of one device. When the guest sets DRIVER_OK the transport only signals
//! an eventfd; the VMM thread then activates the device, so no device work runs on a vCPU thread.

pub mod block;
pub mod mmio;
pub mod net;

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::bus::lock;

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
            tracing::warn!("cannot raise a virtio interrupt: {e}");
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

/// What a device receives when the driver sets DRIVER_OK.
pub struct Activation {
    pub mem: GuestMemoryMmap,
    pub queues: Vec<Queue>,
    pub acked_features: u64,
    pub interrupt: Arc<Interrupt>,
}

/// Copies the part of a device's configuration space at `offset` into `data`; bytes past its
/// end read as zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let start = usize::try_from(offset).unwrap_or(usize::MAX);
    if start < config.len() {
        let n = data.len().min(config.len() - start);
        data[..n].copy_from_slice(&config[start..start + n]);
    }
}

/// A virtio device's own behaviour; the transport does the rest.
pub trait VirtioDevice: Send {
    /// virtio device type id.
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features offered to the driver.
    fn features(&self) -> u64;
    /// Reads device configuration space at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device configuration space at `offset` (most devices ignore it).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts the device with the driver's queues. Runs on the VMM thread.
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError>;
    /// Whether the device is running.
    fn is_active(&self) -> bool;
    /// Stops the device and forgets its queues (driver reset).
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
}

/// A device shared between its transport and its event-loop subscriber.
pub type SharedVirtioDevice = Arc<Mutex<dyn VirtioDevice>>;

/// Event-loop subscriber of one virtio-mmio slot: activation requests and queue notifications.
pub struct VirtioSlot {
    transport: Arc<Mutex<mmio::MmioTransport>>,
    device: SharedVirtioDevice,
    activate_evt: EventFd,
    queue_evts: Vec<EventFd>,
}

impl VirtioSlot {
    pub fn new(
        transport: Arc<Mutex<mmio::MmioTransport>>,
        device: SharedVirtioDevice,
        activate_evt: EventFd,
        queue_evts: Vec<EventFd>,
    ) -> Self {
        VirtioSlot {
            transport,
            device,
            activate_evt,
            queue_evts,
        }
    }

    fn activate(&mut self) {
        let _ = self.activate_evt.read();
        let mut transport = lock(&self.transport);
        if let Err(e) = transport.activate_device() {
            tracing::warn!("virtio device activation failed: {e}");
        }
    }
}

impl MutEventSubscriber for VirtioSlot {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.activate_evt.as_raw_fd() {
            self.activate();
            return;
        }
        if let Some(index) = self.queue_evts.iter().position(|e| e.as_raw_fd() == fd) {
            let _ = self.queue_evts[index].read();
            let mut device = lock(&self.device);
            if device.is_active() {
                device.process_queue(index);
            }
            return;
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
