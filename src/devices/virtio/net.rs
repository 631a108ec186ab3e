//! virtio-net backed by a host TAP device: receive queue 0, transmit queue 1, the 12-byte
//! virtio-net header passed through to the TAP (which is told the guest's offloads). Frames the
//! guest has no room for wait in the device (back-pressure) instead of being dropped; frames that
//! cannot be delivered at all are counted. Runs on the VMM thread.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use super::{
    ActivateError, Activation, Interrupt, VirtioDevice, INT_VRING, TYPE_NET, VIRTIO_F_VERSION_1,
};
use crate::devices::rate_limiter::RateLimiter;
use crate::devices::tap::{self, Tap, VNET_HDR_LEN};

const RX: usize = 0;
const TX: usize = 1;
const QUEUE_SIZE: u16 = 256;
/// Largest frame with its header: a 64 KiB GSO frame plus the Ethernet header and the vnet header.
const MAX_FRAME: usize = 65_562;

const F_CSUM: u64 = 1 << 0;
const F_GUEST_CSUM: u64 = 1 << 1;
const F_MTU: u64 = 1 << 3;
const F_MAC: u64 = 1 << 5;
const F_GUEST_TSO4: u64 = 1 << 7;
const F_GUEST_TSO6: u64 = 1 << 8;
const F_GUEST_UFO: u64 = 1 << 10;
const F_HOST_TSO4: u64 = 1 << 11;
const F_HOST_TSO6: u64 = 1 << 12;
const F_HOST_UFO: u64 = 1 << 14;

/// Counters of one interface, read by the metrics code.
#[derive(Debug, Default)]
pub struct NetStats {
    pub rx_frames: AtomicU64,
    pub rx_bytes: AtomicU64,
    pub tx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// Frames from the TAP that did not fit the guest's buffer.
    pub rx_dropped: AtomicU64,
    /// Guest frames refused (malformed chain, too large) or failed to write to the TAP.
    pub tx_dropped: AtomicU64,
    /// Times the receive path waited for the guest to post buffers.
    pub rx_waits: AtomicU64,
}

struct Active {
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    interrupt: Arc<Interrupt>,
}

/// A virtio-net device.
pub struct Net {
    pub id: String,
    tap: Tap,
    mac: Option<[u8; 6]>,
    mtu: Option<u16>,
    features: u64,
    queue_sizes: [u16; 2],
    active: Option<Active>,
    rx_buf: Vec<u8>,
    /// Length of a frame read from the TAP but not yet delivered; 0 when none.
    rx_pending: usize,
    tx_buf: Vec<u8>,
    rx_limiter: RateLimiter,
    tx_limiter: RateLimiter,
    pub stats: Arc<NetStats>,
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("id", &self.id)
            .field("tap", &self.tap.name)
            .finish()
    }
}

/// Copies `frame` into the device-writable buffers of a chain; `None` if it does not fit or a
/// buffer is invalid.
fn scatter(mem: &GuestMemoryMmap, descs: &[Descriptor], frame: &[u8]) -> Option<usize> {
    let mut offset = 0;
    for d in descs {
        if offset == frame.len() {
            break;
        }
        if !d.is_write_only() {
            return None;
        }
        let n = (d.len() as usize).min(frame.len() - offset);
        mem.write_slice(&frame[offset..offset + n], d.addr()).ok()?;
        offset += n;
    }
    (offset == frame.len()).then_some(offset)
}

/// Gathers the device-readable buffers of a chain into `buf`; `None` if malformed or too large.
fn gather(mem: &GuestMemoryMmap, descs: &[Descriptor], buf: &mut [u8]) -> Option<usize> {
    let mut len = 0usize;
    for d in descs {
        if d.is_write_only() {
            return None;
        }
        let n = d.len() as usize;
        let end = len.checked_add(n).filter(|&e| e <= buf.len())?;
        mem.read_slice(&mut buf[len..end], d.addr()).ok()?;
        len = end;
    }
    (len >= VNET_HDR_LEN).then_some(len)
}

impl Net {
    pub fn new(
        id: String,
        tap: Tap,
        mac: Option<[u8; 6]>,
        mtu: Option<u16>,
        limiters: (RateLimiter, RateLimiter),
    ) -> Net {
        let mut features = VIRTIO_F_VERSION_1
            | F_CSUM
            | F_GUEST_CSUM
            | F_GUEST_TSO4
            | F_GUEST_TSO6
            | F_GUEST_UFO
            | F_HOST_TSO4
            | F_HOST_TSO6
            | F_HOST_UFO;
        if mac.is_some() {
            features |= F_MAC;
        }
        if mtu.is_some() {
            features |= F_MTU;
        }
        Net {
            id,
            tap,
            mac,
            mtu,
            features,
            queue_sizes: [QUEUE_SIZE, QUEUE_SIZE],
            active: None,
            rx_buf: vec![0; MAX_FRAME],
            rx_pending: 0,
            tx_buf: vec![0; MAX_FRAME],
            rx_limiter: limiters.0,
            tx_limiter: limiters.1,
            stats: Arc::new(NetStats::default()),
        }
    }

    /// Replaces the rate limits (PATCH /network-interfaces).
    pub fn set_rate_limiters(
        &mut self,
        rx: Option<&crate::config::RateLimiterConfig>,
        tx: Option<&crate::config::RateLimiterConfig>,
    ) {
        if let Some(rx) = rx {
            self.rx_limiter.update(Some(rx));
        }
        if let Some(tx) = tx {
            self.tx_limiter.update(Some(tx));
        }
    }

    /// Moves frames from the TAP into the guest until the TAP is empty, the guest has no
    /// buffers, or the receive limiter says stop.
    fn receive(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mut delivered = false;
        loop {
            if self.rx_pending == 0 {
                match self.tap.read_frame(&mut self.rx_buf) {
                    Ok(n) if n > VNET_HDR_LEN => self.rx_pending = n,
                    Ok(_) => continue, // runt: nothing to deliver
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        tracing::debug!("TAP {} read failed: {e}", self.tap.name);
                        break;
                    }
                }
            }
            let Some(chain) = active.rx.pop_descriptor_chain(&active.mem) else {
                self.stats.rx_waits.fetch_add(1, Ordering::Relaxed);
                break; // the guest's next rx notification resumes us
            };
            let frame_len = (self.rx_pending - VNET_HDR_LEN) as u64;
            if !self.rx_limiter.consume(frame_len) {
                active.rx.go_to_previous_position();
                break; // the limiter's timer resumes us
            }
            let head = chain.head_index();
            let descs: Vec<Descriptor> = chain.collect();
            // Without mergeable buffers every frame uses one buffer: num_buffers = 1.
            self.rx_buf[10..12].copy_from_slice(&1u16.to_le_bytes());
            let used = match scatter(&active.mem, &descs, &self.rx_buf[..self.rx_pending]) {
                Some(n) => {
                    self.stats.rx_frames.fetch_add(1, Ordering::Relaxed);
                    self.stats.rx_bytes.fetch_add(frame_len, Ordering::Relaxed);
                    n as u32
                }
                None => {
                    self.stats.rx_dropped.fetch_add(1, Ordering::Relaxed);
                    0
                }
            };
            self.rx_pending = 0;
            if active.rx.add_used(&active.mem, head, used).is_err() {
                break;
            }
            delivered = true;
        }
        if delivered && active.rx.needs_notification(&active.mem).unwrap_or(true) {
            active.interrupt.raise(INT_VRING);
        }
    }

    /// Sends the guest's queued frames to the TAP.
    fn transmit(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mut completed = false;
        while let Some(chain) = active.tx.pop_descriptor_chain(&active.mem) {
            let head = chain.head_index();
            let descs: Vec<Descriptor> = chain.collect();
            let bytes: u64 = descs.iter().map(|d| u64::from(d.len())).sum();
            if !self
                .tx_limiter
                .consume(bytes.saturating_sub(VNET_HDR_LEN as u64))
            {
                active.tx.go_to_previous_position();
                break;
            }
            match gather(&active.mem, &descs, &mut self.tx_buf) {
                Some(len) => match self.tap.write_frame(&self.tx_buf[..len]) {
                    Ok(_) => {
                        self.stats.tx_frames.fetch_add(1, Ordering::Relaxed);
                        let payload = (len - VNET_HDR_LEN) as u64;
                        self.stats.tx_bytes.fetch_add(payload, Ordering::Relaxed);
                    }
                    Err(_) => {
                        self.stats.tx_dropped.fetch_add(1, Ordering::Relaxed);
                    }
                },
                None => {
                    self.stats.tx_dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
            if active.tx.add_used(&active.mem, head, 0).is_err() {
                break;
            }
            completed = true;
        }
        if completed && active.tx.needs_notification(&active.mem).unwrap_or(true) {
            active.interrupt.raise(INT_VRING);
        }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; 12];
        if let Some(mac) = self.mac {
            config[..6].copy_from_slice(&mac);
        }
        config[8..10].copy_from_slice(&1u16.to_le_bytes()); // max_virtqueue_pairs
        config[10..12].copy_from_slice(&self.mtu.unwrap_or(1500).to_le_bytes());
        super::read_config_bytes(&config, offset, data);
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let found = activation.queues.len();
        let mut queues = activation.queues.into_iter();
        let (Some(rx), Some(tx), None) = (queues.next(), queues.next(), queues.next()) else {
            return Err(ActivateError::QueueCount { expected: 2, found });
        };
        let acked = activation.acked_features;
        let mut offload = 0;
        for (feature, flag) in [
            (F_GUEST_CSUM, tap::TUN_F_CSUM),
            (F_GUEST_TSO4, tap::TUN_F_TSO4),
            (F_GUEST_TSO6, tap::TUN_F_TSO6),
            (F_GUEST_UFO, tap::TUN_F_UFO),
        ] {
            if acked & feature != 0 {
                offload |= flag;
            }
        }
        if let Err(e) = self.tap.set_offload(offload) {
            tracing::warn!("{}: {}", self.id, crate::error_chain(&e));
        }
        self.active = Some(Active {
            mem: activation.mem,
            rx,
            tx,
            interrupt: activation.interrupt,
        });
        // Frames may already be waiting on the TAP (edge-triggered: read them now).
        self.receive();
        Ok(())
    }

    fn is_active(&self) -> bool {
        self.active.is_some()
    }

    fn reset(&mut self) {
        self.active = None;
        self.rx_pending = 0;
    }

    fn process_queue(&mut self, index: usize) {
        match index {
            RX => self.receive(),
            TX => self.transmit(),
            _ => {}
        }
    }

    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        self.active
            .iter()
            .flat_map(|a| [a.rx.state(), a.tx.state()])
            .collect()
    }

    fn event_fds(&self) -> Vec<(RawFd, EventSet)> {
        vec![
            (self.tap.fd(), EventSet::IN | EventSet::EDGE_TRIGGERED),
            (self.rx_limiter.timer_fd(), EventSet::IN),
            (self.tx_limiter.timer_fd(), EventSet::IN),
        ]
    }

    fn process_fd(&mut self, fd: RawFd) {
        if fd == self.tap.fd() {
            self.receive();
        } else if fd == self.rx_limiter.timer_fd() {
            self.rx_limiter.timer_fired();
            self.receive();
        } else if fd == self.tx_limiter.timer_fd() {
            self.tx_limiter.timer_fired();
            self.transmit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    const F_WRITE: u16 = 2;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    #[test]
    fn scatter_spreads_a_frame_over_writable_buffers() {
        let mem = mem();
        let descs = [
            Descriptor::new(0x1000, 4, F_WRITE, 0),
            Descriptor::new(0x2000, 16, F_WRITE, 0),
        ];
        assert_eq!(scatter(&mem, &descs, b"0123456789"), Some(10));
        let mut a = [0u8; 4];
        let mut b = [0u8; 6];
        mem.read_slice(&mut a, GuestAddress(0x1000)).unwrap();
        mem.read_slice(&mut b, GuestAddress(0x2000)).unwrap();
        assert_eq!((&a, &b), (b"0123", b"456789"));
    }

    #[test]
    fn scatter_refuses_frames_that_do_not_fit_or_readable_buffers() {
        let mem = mem();
        let small = [Descriptor::new(0x1000, 4, F_WRITE, 0)];
        assert_eq!(scatter(&mem, &small, b"0123456789"), None);
        let readable = [Descriptor::new(0x1000, 64, 0, 0)];
        assert_eq!(scatter(&mem, &readable, b"0123"), None);
        let outside = [Descriptor::new(0xfff_0000, 64, F_WRITE, 0)];
        assert_eq!(scatter(&mem, &outside, b"0123"), None);
    }

    #[test]
    fn gather_collects_readable_buffers_and_checks_bounds() {
        let mem = mem();
        mem.write_slice(&[1u8; 12], GuestAddress(0x1000)).unwrap();
        mem.write_slice(b"frame", GuestAddress(0x2000)).unwrap();
        let mut buf = vec![0u8; 64];
        let descs = [
            Descriptor::new(0x1000, 12, 0, 0),
            Descriptor::new(0x2000, 5, 0, 0),
        ];
        assert_eq!(gather(&mem, &descs, &mut buf), Some(17));
        assert_eq!(&buf[12..17], b"frame");
        let too_big = [Descriptor::new(0x1000, 65, 0, 0)];
        assert_eq!(gather(&mem, &too_big, &mut buf), None);
        let writable = [Descriptor::new(0x1000, 12, F_WRITE, 0)];
        assert_eq!(gather(&mem, &writable, &mut buf), None);
        let runt = [Descriptor::new(0x1000, 8, 0, 0)];
        assert_eq!(gather(&mem, &runt, &mut buf), None);
    }
}
