//! The virtio-mmio transport, version 2 (virtio 1.x, spec 4.2.2): the register file a driver
//! uses to discover the device, negotiate features, set up queues and drive the status machine.
//! Runs on vCPU threads and never takes the device's lock there (the VMM thread holds it across
//! host I/O): what it reports of the device (type, features, queue sizes) is copied at creation,
//! configuration space is shared through [`ConfigSpace`], and activation and reset are requested
//! through an eventfd and carried out by the VMM thread ([`super::VirtioSlot`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::memory::GuestMemoryMmap;
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{ActivateError, Activation, ConfigSpace, Interrupt, SharedVirtioDevice, INT_CONFIG};
use crate::devices::bus::{lock, BusDevice};

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x4b43_4c46; // "FLCK"
const CONFIG_SPACE: u64 = 0x100;

/// Device status bits (spec 2.1).
pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_NEEDS_RESET: u32 = 0x40;
pub const STATUS_FAILED: u32 = 0x80;

/// A queue's registers and progress, for snapshots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
}

impl From<QueueState> for QueueSnapshot {
    fn from(q: QueueState) -> Self {
        QueueSnapshot {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
        }
    }
}

impl From<&QueueSnapshot> for QueueState {
    fn from(q: &QueueSnapshot) -> Self {
        QueueState {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
        }
    }
}

/// The transport's registers, for snapshots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportSnapshot {
    pub features_select: u32,
    pub acked_features_select: u32,
    pub acked_features: u64,
    pub queue_select: u32,
    pub status: u32,
    pub config_generation: u32,
    pub interrupt_status: u32,
    pub queues: Vec<QueueSnapshot>,
}

/// One device's transport state.
pub struct MmioTransport {
    /// Locked only on the VMM thread (activation, reset, snapshots).
    device: SharedVirtioDevice,
    device_type: u32,
    offered_features: u64,
    config: Arc<ConfigSpace>,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    /// Signalled when the VMM thread has work: a driver reset or DRIVER_OK.
    activate_evt: EventFd,
    /// Set with every signal on `activate_evt`, so the VMM thread can check for such work
    /// before a queue notification without a system call.
    sync_requested: Arc<AtomicBool>,
    /// The driver reset the device; the VMM thread resets it before anything else.
    reset_pending: bool,
    features_select: u32,
    acked_features_select: u32,
    acked_features: u64,
    queue_select: u32,
    queues: Vec<Queue>,
    status: u32,
    config_generation: u32,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("status", &self.status)
            .finish()
    }
}

impl MmioTransport {
    /// A transport for `device`; `activate_evt` is signalled when the driver sets DRIVER_OK.
    pub fn new(
        device: SharedVirtioDevice,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        activate_evt: EventFd,
    ) -> Self {
        let (sizes, device_type, offered_features, config) = {
            let d = lock(&device);
            (
                d.queue_max_sizes().to_vec(),
                d.device_type(),
                d.features(),
                d.config_space(),
            )
        };
        let queues = sizes
            .iter()
            .filter_map(|&size| Queue::new(size).ok())
            .collect();
        MmioTransport {
            device,
            device_type,
            offered_features,
            config,
            mem,
            interrupt,
            activate_evt,
            sync_requested: Arc::new(AtomicBool::new(false)),
            reset_pending: false,
            features_select: 0,
            acked_features_select: 0,
            acked_features: 0,
            queue_select: 0,
            queues,
            status: 0,
            config_generation: 0,
        }
    }

    /// Captures the registers and, for an active device, its live queue progress.
    pub fn snapshot(&self) -> TransportSnapshot {
        // An active device's queues (the first ones, when it uses fewer than it has) hold the
        // live progress; the transport's copies hold the rest.
        let mut live = lock(&self.device).queue_states().into_iter();
        let queues = self
            .queues
            .iter()
            .map(|q| QueueSnapshot::from(live.next().unwrap_or_else(|| q.state())))
            .collect();
        TransportSnapshot {
            features_select: self.features_select,
            acked_features_select: self.acked_features_select,
            acked_features: self.acked_features,
            queue_select: self.queue_select,
            status: self.status,
            config_generation: self.config_generation,
            interrupt_status: self
                .interrupt
                .status
                .load(std::sync::atomic::Ordering::SeqCst),
            queues,
        }
    }

    /// Restores registers and queues; re-activates the device if the driver had started it.
    pub fn restore(&mut self, snap: &TransportSnapshot) -> Result<(), ActivateError> {
        if snap.queues.len() != self.queues.len() {
            return Err(ActivateError::QueueCount {
                expected: self.queues.len(),
                found: snap.queues.len(),
            });
        }
        let queues = snap
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| {
                Queue::try_from(QueueState::from(q)).map_err(|_| ActivateError::BadQueue(i))
            })
            .collect::<Result<Vec<_>, _>>()?;
        self.queues = queues;
        self.features_select = snap.features_select;
        self.acked_features_select = snap.acked_features_select;
        self.acked_features = snap.acked_features;
        self.queue_select = snap.queue_select;
        self.status = snap.status;
        self.config_generation = snap.config_generation;
        self.interrupt
            .status
            .store(snap.interrupt_status, std::sync::atomic::Ordering::SeqCst);
        self.activate_device()
    }

    /// Tells the driver the configuration changed (e.g. new disk capacity).
    pub fn notify_config_change(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        self.interrupt.raise(INT_CONFIG);
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        let configurable =
            self.status & STATUS_FEATURES_OK != 0 && self.status & STATUS_DRIVER_OK == 0;
        if !configurable {
            return None;
        }
        self.queues.get_mut(self.queue_select as usize)
    }

    fn mark_needs_reset(&mut self) {
        self.status |= STATUS_NEEDS_RESET;
        self.interrupt.raise(INT_CONFIG);
    }

    /// The driver's reset: the registers go back to their initial values at once; the device
    /// itself is reset by the VMM thread ([`MmioTransport::sync_device`]).
    fn reset(&mut self) {
        self.reset_pending = true;
        if let Err(e) = self.request_sync() {
            crate::warn_limited!("cannot request a virtio device reset: {e}");
        }
        for queue in &mut self.queues {
            queue.reset();
        }
        self.features_select = 0;
        self.acked_features_select = 0;
        self.acked_features = 0;
        self.queue_select = 0;
        self.status = 0;
        self.interrupt
            .status
            .store(0, std::sync::atomic::Ordering::SeqCst);
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // Drivers only ever add bits; anything else is a driver bug we refuse.
        if value & self.status != self.status & !STATUS_NEEDS_RESET {
            tracing::debug!("virtio: refused status {value:#x} from {:#x}", self.status);
            return;
        }
        let added = value & !self.status;
        if added & STATUS_FEATURES_OK != 0 && self.acked_features & super::VIRTIO_F_VERSION_1 == 0 {
            // A legacy driver: leave FEATURES_OK clear so it sees the refusal.
            self.status = value & !STATUS_FEATURES_OK;
            return;
        }
        if added & STATUS_DRIVER_OK != 0 && value & STATUS_FEATURES_OK == 0 {
            return;
        }
        self.status = value;
        if added & STATUS_DRIVER_OK != 0 {
            if let Err(e) = self.request_sync() {
                crate::warn_limited!("cannot request virtio activation: {e}");
                self.mark_needs_reset();
            }
        }
    }

    /// Asks the VMM thread to carry out a reset or activation.
    fn request_sync(&self) -> std::io::Result<()> {
        self.sync_requested.store(true, Ordering::Release);
        self.activate_evt.write(1)
    }

    /// The flag raised with every request to the VMM thread ([`MmioTransport::sync_device`]).
    pub fn sync_requested(&self) -> Arc<AtomicBool> {
        self.sync_requested.clone()
    }

    /// Called on the VMM thread when the transport signalled: applies a pending driver reset,
    /// then activates the device if the driver has set DRIVER_OK.
    pub fn sync_device(&mut self) -> Result<(), ActivateError> {
        if std::mem::take(&mut self.reset_pending) {
            lock(&self.device).reset();
        }
        self.activate_device()
    }

    /// Called on the VMM thread after DRIVER_OK: hands the queues to the device.
    pub fn activate_device(&mut self) -> Result<(), ActivateError> {
        let in_use = {
            let device = lock(&self.device);
            if self.status & STATUS_DRIVER_OK == 0 || device.is_active() {
                return Ok(());
            }
            device
                .queues_in_use(self.acked_features)
                .min(self.queues.len())
        };
        let result = self.check_queues(in_use).and_then(|()| {
            let queues = self.queues[..in_use]
                .iter()
                .map(|q| Queue::try_from(q.state()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| ActivateError::BadQueue(0))?;
            let activation = Activation {
                mem: self.mem.clone(),
                queues,
                acked_features: self.acked_features,
                interrupt: self.interrupt.clone(),
            };
            lock(&self.device).activate(activation)
        });
        if result.is_err() {
            self.mark_needs_reset();
        }
        result
    }

    /// Checks that the first `in_use` queues are ready and valid in guest memory.
    fn check_queues(&self, in_use: usize) -> Result<(), ActivateError> {
        let queues = &self.queues[..in_use];
        let ready = queues.iter().filter(|q| q.ready()).count();
        if ready != in_use {
            return Err(ActivateError::QueueCount {
                expected: in_use,
                found: ready,
            });
        }
        match queues.iter().position(|q| !q.is_valid(&self.mem)) {
            Some(index) => Err(ActivateError::BadQueue(index)),
            None => Ok(()),
        }
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        match offset {
            0x000 => MAGIC,
            0x004 => VERSION,
            0x008 => self.device_type,
            0x00c => VENDOR_ID,
            // Feature pages: the low and the high 32 bits.
            0x010 => match self.features_select {
                0 => (self.offered_features & 0xffff_ffff) as u32,
                1 => (self.offered_features >> 32) as u32,
                _ => 0,
            },
            0x034 => {
                let index = self.queue_select as usize;
                self.queues
                    .get(index)
                    .map_or(0, |q| u32::from(q.max_size()))
            }
            0x044 => {
                let index = self.queue_select as usize;
                self.queues.get(index).map_or(0, |q| u32::from(q.ready()))
            }
            0x060 => self
                .interrupt
                .status
                .load(std::sync::atomic::Ordering::SeqCst),
            0x070 => self.status,
            0x0fc => self.config_generation,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        let features_writable =
            self.status & STATUS_DRIVER != 0 && self.status & STATUS_FEATURES_OK == 0;
        match offset {
            0x014 => self.features_select = value,
            0x020 if features_writable => {
                let offered = self.offered_features;
                let (shift, mask) = match self.acked_features_select {
                    0 => (0, 0xffff_ffffu64),
                    1 => (32, 0xffff_ffff_0000_0000u64),
                    _ => return,
                };
                let bits = (u64::from(value) << shift) & offered;
                self.acked_features = (self.acked_features & !mask) | bits;
            }
            0x024 => self.acked_features_select = value,
            0x030 => self.queue_select = value,
            0x038 => {
                if let Some(q) = self.selected_queue() {
                    // Invalid sizes (0, not a power of two, too big) leave the queue unusable,
                    // which activation then reports.
                    let size = u16::try_from(value).unwrap_or(0);
                    q.set_size(size);
                }
            }
            0x044 => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(value == 1);
                }
            }
            0x064 => {
                self.interrupt
                    .status
                    .fetch_and(!value, std::sync::atomic::Ordering::SeqCst);
            }
            0x070 => self.set_status(value),
            0x080 => self.with_queue(|q| q.set_desc_table_address(Some(value), None)),
            0x084 => self.with_queue(|q| q.set_desc_table_address(None, Some(value))),
            0x090 => self.with_queue(|q| q.set_avail_ring_address(Some(value), None)),
            0x094 => self.with_queue(|q| q.set_avail_ring_address(None, Some(value))),
            0x0a0 => self.with_queue(|q| q.set_used_ring_address(Some(value), None)),
            0x0a4 => self.with_queue(|q| q.set_used_ring_address(None, Some(value))),
            _ => {}
        }
    }

    fn with_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if let Some(q) = self.selected_queue() {
            f(q);
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            self.config.read(offset - CONFIG_SPACE, data);
            return;
        }
        if data.len() != 4 {
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_register(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            // Only a device's writable fields take the write; anything else is ignored.
            self.config.write(offset - CONFIG_SPACE, data);
            return;
        }
        if let Ok(bytes) = <[u8; 4]>::try_from(data) {
            self.write_register(offset, u32::from_le_bytes(bytes));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{VirtioDevice, VIRTIO_F_VERSION_1};
    use super::*;
    use std::sync::Mutex;
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    struct Dummy {
        active: bool,
        config: Arc<ConfigSpace>,
        resets: u32,
    }

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            2
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16]
        }
        fn features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | 0b101
        }
        fn config_space(&self) -> Arc<ConfigSpace> {
            self.config.clone()
        }
        fn activate(&mut self, _: Activation) -> Result<(), ActivateError> {
            self.active = true;
            Ok(())
        }
        fn is_active(&self) -> bool {
            self.active
        }
        fn reset(&mut self) {
            self.active = false;
            self.resets += 1;
        }
        fn process_queue(&mut self, _: usize) {}
        fn queue_states(&self) -> Vec<QueueState> {
            Vec::new()
        }
        fn saved_config(&self) -> serde_json::Value {
            serde_json::Value::Null
        }
        fn save_state(&self) -> serde_json::Value {
            serde_json::Value::Null
        }
        fn restore_state(
            &mut self,
            _: &serde_json::Value,
        ) -> Result<(), super::super::DeviceError> {
            Ok(())
        }
        fn metrics(&self, _: &mut Vec<crate::metrics::Sample>) {}
        fn update(
            &mut self,
            _: &super::super::DeviceUpdate,
        ) -> Result<bool, super::super::DeviceError> {
            Ok(false)
        }
    }

    fn setup() -> (MmioTransport, Arc<Mutex<Dummy>>, EventFd) {
        setup_with(ConfigSpace::new(b"abcdefgh".to_vec()))
    }

    fn setup_with(config: Arc<ConfigSpace>) -> (MmioTransport, Arc<Mutex<Dummy>>, EventFd) {
        let dev = Arc::new(Mutex::new(Dummy {
            active: false,
            config,
            resets: 0,
        }));
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let irq = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        let activate = EventFd::new(EFD_NONBLOCK).unwrap();
        let observer = activate.try_clone().unwrap();
        (
            MmioTransport::new(dev.clone(), mem, irq, activate),
            dev,
            observer,
        )
    }

    fn rd(t: &mut MmioTransport, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        t.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn wr(t: &mut MmioTransport, offset: u64, value: u32) {
        t.write(offset, &value.to_le_bytes());
    }

    fn negotiate(t: &mut MmioTransport, high_features: u32) {
        wr(t, 0x70, STATUS_ACKNOWLEDGE);
        wr(t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        wr(t, 0x24, 1);
        wr(t, 0x20, high_features);
        wr(
            t,
            0x70,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
    }

    fn setup_queue(t: &mut MmioTransport) {
        wr(t, 0x30, 0);
        wr(t, 0x38, 16);
        wr(t, 0x80, 0x1000);
        wr(t, 0x90, 0x2000);
        wr(t, 0xa0, 0x3000);
        wr(t, 0x44, 1);
    }

    #[test]
    fn config_writes_reach_only_the_writable_bytes() {
        let (mut t, dev, _) = setup_with(ConfigSpace::with_writable(b"abcdefgh".to_vec(), 4..8));
        wr(&mut t, CONFIG_SPACE, u32::from_le_bytes(*b"WXYZ"));
        wr(&mut t, CONFIG_SPACE + 4, u32::from_le_bytes(*b"wxyz"));
        wr(&mut t, CONFIG_SPACE + 6, u32::from_le_bytes(*b"1234"));
        let mut bytes = [0u8; 8];
        dev.lock().unwrap().config.read(0, &mut bytes);
        assert_eq!(&bytes, b"abcdwxyz");
    }

    #[test]
    fn identification_registers_describe_a_version_2_device() {
        let (mut t, _, _) = setup();
        assert_eq!(rd(&mut t, 0x0), MAGIC);
        assert_eq!(rd(&mut t, 0x4), 2);
        assert_eq!(rd(&mut t, 0x8), 2);
        assert_eq!(rd(&mut t, 0x34), 16);
    }

    #[test]
    fn feature_pages_read_and_ack_only_offered_bits() {
        let (mut t, _, _) = setup();
        assert_eq!(rd(&mut t, 0x10), 0b101);
        wr(&mut t, 0x14, 1);
        assert_eq!(rd(&mut t, 0x10), 1);
        wr(&mut t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        wr(&mut t, 0x20, 0xffff_ffff);
        assert_eq!(t.acked_features, 0b101);
    }

    #[test]
    fn features_ok_requires_version_1() {
        let (mut t, _, _) = setup();
        negotiate(&mut t, 0);
        assert_eq!(rd(&mut t, 0x70) & STATUS_FEATURES_OK, 0);
        let (mut t, _, _) = setup();
        negotiate(&mut t, 1);
        assert_ne!(rd(&mut t, 0x70) & STATUS_FEATURES_OK, 0);
    }

    #[test]
    fn driver_ok_requests_activation_and_vmm_activates() {
        let (mut t, dev, observer) = setup();
        negotiate(&mut t, 1);
        setup_queue(&mut t);
        wr(
            &mut t,
            0x70,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        assert_eq!(observer.read().unwrap(), 1);
        assert!(
            !dev.lock().unwrap().active,
            "activation happens on the VMM thread"
        );
        t.activate_device().unwrap();
        assert!(dev.lock().unwrap().active);
    }

    #[test]
    fn activation_without_ready_queue_marks_needs_reset() {
        let (mut t, dev, _) = setup();
        negotiate(&mut t, 1);
        wr(
            &mut t,
            0x70,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        assert!(t.activate_device().is_err());
        assert!(!dev.lock().unwrap().active);
        assert_ne!(rd(&mut t, 0x70) & STATUS_NEEDS_RESET, 0);
    }

    #[test]
    fn queue_outside_guest_memory_is_refused_at_activation() {
        let (mut t, _, _) = setup();
        negotiate(&mut t, 1);
        setup_queue(&mut t);
        wr(&mut t, 0x84, 0x10); // descriptor table far above guest RAM
        wr(
            &mut t,
            0x70,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        assert_eq!(t.activate_device(), Err(ActivateError::BadQueue(0)));
    }

    #[test]
    fn queue_registers_are_ignored_before_features_ok() {
        let (mut t, _, _) = setup();
        setup_queue(&mut t);
        assert_eq!(rd(&mut t, 0x44), 0);
    }

    #[test]
    fn writing_zero_status_resets_device_and_transport() {
        let (mut t, dev, _) = setup();
        negotiate(&mut t, 1);
        setup_queue(&mut t);
        wr(&mut t, 0x70, 0);
        assert_eq!(rd(&mut t, 0x70), 0);
        assert_eq!(rd(&mut t, 0x44), 0);
        assert_eq!(
            dev.lock().unwrap().resets,
            0,
            "the vCPU does not touch the device"
        );
        t.sync_device().unwrap();
        assert_eq!(dev.lock().unwrap().resets, 1);
    }

    #[test]
    fn registers_are_served_while_the_device_is_locked() {
        let (mut t, dev, _) = setup();
        let held = dev.lock().unwrap();
        assert_eq!(rd(&mut t, 0x8), 2);
        assert_eq!(rd(&mut t, 0x10), 0b101);
        let mut two = [0u8; 2];
        t.read(0x100, &mut two);
        assert_eq!(&two, b"ab");
        negotiate(&mut t, 1);
        wr(&mut t, 0x70, 0);
        drop(held);
    }

    #[test]
    fn clearing_status_bits_is_refused() {
        let (mut t, _, _) = setup();
        negotiate(&mut t, 1);
        wr(&mut t, 0x70, STATUS_ACKNOWLEDGE);
        assert_ne!(rd(&mut t, 0x70) & STATUS_FEATURES_OK, 0);
    }

    #[test]
    fn config_space_reads_reach_the_device_at_any_width() {
        let (mut t, _, _) = setup();
        let mut two = [0u8; 2];
        t.read(0x102, &mut two);
        assert_eq!(&two, b"cd");
    }

    #[test]
    fn interrupt_ack_clears_status_bits() {
        let (mut t, _, _) = setup();
        t.notify_config_change();
        assert_eq!(rd(&mut t, 0x60), INT_CONFIG);
        assert_eq!(rd(&mut t, 0xfc), 1);
        wr(&mut t, 0x64, INT_CONFIG);
        assert_eq!(rd(&mut t, 0x60), 0);
    }

    #[test]
    fn narrow_register_access_is_ignored() {
        let (mut t, _, _) = setup();
        let mut one = [0xffu8; 1];
        t.read(0x0, &mut one);
        assert_eq!(one, [0]);
        t.write(0x70, &[1]);
        assert_eq!(rd(&mut t, 0x70), 0);
    }
}
