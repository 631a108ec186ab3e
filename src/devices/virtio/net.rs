//! virtio-net on a host backend (a TAP device, or a fake one in tests): receive queue 0,
//! transmit queue 1, the 12-byte virtio-net header passed through to the backend (which is told
//! the guest's offloads). Frames the guest has no room for wait in the device (back-pressure)
//! instead of being dropped; frames that cannot be delivered at all are counted. On an interface
//! with MMDS enabled, guest frames for the MMDS address go to its responder
//! ([`crate::mmds::stack`]) instead of the backend, and its answers reach the guest before
//! frames from the backend. Runs on the VMM thread.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::memory::GuestMemoryMmap;
use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_net as vn;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::Bytes;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::timerfd::TimerFd;

use super::{
    from_saved, to_saved, ActivateError, Activation, ConfigSpace, DeviceError, DeviceKind,
    DeviceUpdate, Interrupt, NewDevice, Overrides, VirtioDevice, INT_VRING, TYPE_NET,
    VIRTIO_F_VERSION_1,
};
use crate::config::{NetConfig, VmConfig};
use crate::devices::rate_limiter::{LimiterBudget, RateLimiter, SavedLimits};
use crate::devices::tap::{self, Tap, VNET_HDR_LEN};
use crate::metrics::{counters, Sample, THROTTLED};
use crate::mmds::stack::MmdsStack;
use crate::mmds::SharedMmds;

const RX: usize = 0;
const TX: usize = 1;
const QUEUE_SIZE: u16 = 256;
/// Largest frame with its header: a 64 KiB GSO frame plus the Ethernet header and the vnet header.
const MAX_FRAME: usize = 65_562;

const F_CSUM: u64 = 1 << vn::VIRTIO_NET_F_CSUM;
const F_GUEST_CSUM: u64 = 1 << vn::VIRTIO_NET_F_GUEST_CSUM;
const F_MTU: u64 = 1 << vn::VIRTIO_NET_F_MTU;
const F_MAC: u64 = 1 << vn::VIRTIO_NET_F_MAC;
const F_GUEST_TSO4: u64 = 1 << vn::VIRTIO_NET_F_GUEST_TSO4;
const F_GUEST_TSO6: u64 = 1 << vn::VIRTIO_NET_F_GUEST_TSO6;
const F_GUEST_UFO: u64 = 1 << vn::VIRTIO_NET_F_GUEST_UFO;
const F_HOST_TSO4: u64 = 1 << vn::VIRTIO_NET_F_HOST_TSO4;
const F_HOST_TSO6: u64 = 1 << vn::VIRTIO_NET_F_HOST_TSO6;
const F_HOST_UFO: u64 = 1 << vn::VIRTIO_NET_F_HOST_UFO;

/// The host side of a virtio-net device: frames in and out, each with its virtio-net header.
pub trait NetBackend: Send {
    /// Reads one frame; `WouldBlock` when none is waiting.
    fn read_frame(&mut self, buf: &mut [u8]) -> std::io::Result<usize>;
    /// Writes one frame.
    fn write_frame(&mut self, frame: &[u8]) -> std::io::Result<usize>;
    /// Tells the backend which offloads the guest accepts (`tap::TUN_F_*`).
    fn set_offloads(&mut self, flags: u32) -> std::io::Result<()>;
    /// The fd that becomes readable when frames arrive (watched edge-triggered).
    fn fd(&self) -> RawFd;
    /// Its name, for messages and snapshots.
    fn name(&self) -> &str;
}

impl NetBackend for Tap {
    fn read_frame(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        Tap::read_frame(self, buf)
    }

    fn write_frame(&mut self, frame: &[u8]) -> std::io::Result<usize> {
        Tap::write_frame(self, frame)
    }

    fn set_offloads(&mut self, flags: u32) -> std::io::Result<()> {
        self.set_offload(flags)
            .map_err(|e| std::io::Error::other(crate::error_chain(&e)))
    }

    fn fd(&self) -> RawFd {
        Tap::fd(self)
    }

    fn name(&self) -> &str {
        &self.name
    }
}

/// The network device kind, for the VMM's device registry.
pub const KIND: DeviceKind = DeviceKind {
    name: "net",
    noun: "network interface",
    id_label: "iface",
    open: open_nets,
    reopen: reopen_net,
    describe: describe_net,
};

/// An interface's settings as snapshots store them (independent of the API's field names).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedNet {
    pub id: String,
    pub tap: String,
    pub mac: Option<[u8; 6]>,
    pub mtu: Option<u16>,
    pub rx_limits: SavedLimits,
    pub tx_limits: SavedLimits,
    /// MMDS on this interface: its address and the service's version and output option.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mmds: Option<SavedMmds>,
}

/// What an interface with MMDS keeps of it across a snapshot (the document is not saved).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedMmds {
    pub ipv4_address: std::net::Ipv4Addr,
    pub version: crate::config::MmdsVersion,
    pub imds_compat: bool,
}

/// What a snapshot keeps of an interface beyond its queues.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct NetState {
    /// A frame read from the backend but not yet delivered to the guest (with its header).
    #[serde(with = "crate::hex")]
    pending_rx: Vec<u8>,
    rx_limiter: LimiterBudget,
    tx_limiter: LimiterBudget,
}

fn retarget(mut saved: SavedNet, overrides: Overrides<'_>) -> SavedNet {
    if let Some((_, tap)) = overrides.taps.iter().find(|(id, _)| *id == saved.id) {
        saved.tap = tap.clone();
    }
    saved
}

fn new_device(saved: SavedNet, store: Option<&SharedMmds>) -> Result<NewDevice, DeviceError> {
    crate::config::validate_tap_name(&saved.tap)?;
    let tap = Tap::open(&saved.tap)?;
    let limiter = |l: SavedLimits| RateLimiter::new(l.to_config().as_ref());
    let rx = limiter(saved.rx_limits).map_err(DeviceError::Timer)?;
    let tx = limiter(saved.tx_limits).map_err(DeviceError::Timer)?;
    let id = saved.id.clone();
    let mut net = Net::new(saved, tap, (rx, tx));
    if let Some(store) = store {
        net.enable_mmds(store).map_err(DeviceError::Timer)?;
    }
    Ok(NewDevice {
        id,
        device: Arc::new(Mutex::new(net)),
        cmdline: Vec::new(),
    })
}

fn saved_from_config(config: &NetConfig, vm: &VmConfig) -> Result<SavedNet, DeviceError> {
    config.validate()?;
    let mmds = vm
        .mmds_config
        .as_ref()
        .filter(|m| m.network_interfaces.contains(&config.iface_id))
        .map(|m| SavedMmds {
            ipv4_address: m.ipv4(),
            version: m.version,
            imds_compat: m.imds_compat,
        });
    let mac = match &config.guest_mac {
        Some(mac) => Some(crate::config::parse_mac(mac)?),
        None => None,
    };
    Ok(SavedNet {
        id: config.iface_id.clone(),
        tap: config.host_dev_name.clone(),
        mac,
        mtu: config.mtu,
        rx_limits: SavedLimits::from(config.rx_rate_limiter.as_ref()),
        tx_limits: SavedLimits::from(config.tx_rate_limiter.as_ref()),
        mmds,
    })
}

/// Opens every configured interface's TAP (`overrides` retarget interfaces to other TAPs).
fn open_nets(config: &VmConfig, overrides: Overrides<'_>) -> Result<Vec<NewDevice>, DeviceError> {
    config
        .network_interfaces
        .iter()
        .map(|n| {
            saved_from_config(n, config)
                .and_then(|saved| {
                    let store = overrides.mmds.filter(|_| saved.mmds.is_some());
                    new_device(retarget(saved, overrides), store)
                })
                .map_err(|e| e.of(KIND.noun, &n.iface_id))
        })
        .collect()
}

fn reopen_net(
    saved: &serde_json::Value,
    overrides: Overrides<'_>,
) -> Result<NewDevice, DeviceError> {
    let saved: SavedNet = from_saved(KIND.name, saved)?;
    let id = saved.id.clone();
    let store = match (&saved.mmds, overrides.mmds) {
        (Some(m), Some(store)) => {
            crate::mmds::lock(store).configure(m.version, m.imds_compat);
            Some(store)
        }
        _ => None,
    };
    new_device(retarget(saved, overrides), store).map_err(|e| e.of(KIND.noun, &id))
}

fn describe_net(saved: &serde_json::Value, config: &mut VmConfig) -> Result<(), DeviceError> {
    let saved: SavedNet = from_saved(KIND.name, saved)?;
    if let Some(m) = &saved.mmds {
        let mmds = config
            .mmds_config
            .get_or_insert_with(|| crate::config::MmdsConfig {
                version: m.version,
                network_interfaces: Vec::new(),
                ipv4_address: Some(m.ipv4_address),
                imds_compat: m.imds_compat,
            });
        if !mmds.network_interfaces.contains(&saved.id) {
            mmds.network_interfaces.push(saved.id.clone());
        }
    }
    let net = NetConfig {
        iface_id: saved.id,
        host_dev_name: saved.tap,
        guest_mac: saved.mac.map(|m| {
            m.iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(":")
        }),
        mtu: saved.mtu,
        rx_rate_limiter: saved.rx_limits.to_config(),
        tx_rate_limiter: saved.tx_limits.to_config(),
    };
    let list = &mut config.network_interfaces;
    match list.iter_mut().find(|n| n.iface_id == net.iface_id) {
        Some(existing) => *existing = net,
        None => list.push(net),
    }
    Ok(())
}

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
    /// Guest frames taken by MMDS instead of going to the backend.
    pub mmds_tx_frames: AtomicU64,
    /// MMDS frames delivered to the guest.
    pub mmds_rx_frames: AtomicU64,
}

struct Active {
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    interrupt: Arc<Interrupt>,
}

/// A virtio-net device.
pub struct Net<B: NetBackend = Tap> {
    /// Its settings, kept current (new limits) for snapshots.
    saved: SavedNet,
    backend: B,
    features: u64,
    config_space: Arc<ConfigSpace>,
    queue_sizes: [u16; 2],
    active: Option<Active>,
    rx_buf: Vec<u8>,
    /// Length of a frame read from the TAP but not yet delivered; 0 when none.
    rx_pending: usize,
    tx_buf: Vec<u8>,
    rx_limiter: RateLimiter,
    tx_limiter: RateLimiter,
    pub stats: Arc<NetStats>,
    /// The MMDS responder and the timer of its retransmissions and time-outs.
    mmds: Option<(MmdsStack, TimerFd)>,
}

impl<B: NetBackend> std::fmt::Debug for Net<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("id", &self.saved.id)
            .field("backend", &self.backend.name())
            .finish()
    }
}

/// Config space: mac, status (unused), max_virtqueue_pairs = 1, mtu.
fn config_bytes(saved: &SavedNet) -> Vec<u8> {
    let mut config = vec![0u8; 12];
    if let Some(mac) = saved.mac {
        config[..6].copy_from_slice(&mac);
    }
    config[8..10].copy_from_slice(&1u16.to_le_bytes());
    config[10..12].copy_from_slice(&saved.mtu.unwrap_or(1500).to_le_bytes());
    config
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

impl<B: NetBackend> Net<B> {
    /// An interface on `backend` with `saved`'s settings and `(rx, tx)` limiters.
    pub fn new(saved: SavedNet, backend: B, limiters: (RateLimiter, RateLimiter)) -> Self {
        let mut features = VIRTIO_F_VERSION_1
            | F_CSUM
            | F_GUEST_CSUM
            | F_GUEST_TSO4
            | F_GUEST_TSO6
            | F_GUEST_UFO
            | F_HOST_TSO4
            | F_HOST_TSO6
            | F_HOST_UFO;
        if saved.mac.is_some() {
            features |= F_MAC;
        }
        if saved.mtu.is_some() {
            features |= F_MTU;
        }
        Net {
            config_space: ConfigSpace::new(config_bytes(&saved)),
            saved,
            backend,
            features,
            queue_sizes: [QUEUE_SIZE, QUEUE_SIZE],
            active: None,
            rx_buf: vec![0; MAX_FRAME],
            rx_pending: 0,
            tx_buf: vec![0; MAX_FRAME],
            rx_limiter: limiters.0,
            tx_limiter: limiters.1,
            stats: Arc::new(NetStats::default()),
            mmds: None,
        }
    }

    /// Answers MMDS on this interface from `store`, at the address in its settings.
    pub fn enable_mmds(&mut self, store: &SharedMmds) -> std::io::Result<()> {
        let ip = self
            .saved
            .mmds
            .as_ref()
            .map_or(crate::config::DEFAULT_MMDS_IPV4, |m| m.ipv4_address);
        let timer = TimerFd::new().map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        // SAFETY: F_SETFL on an fd we own changes only its status flags.
        let set = unsafe { libc::fcntl(timer.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
        if set < 0 {
            return Err(std::io::Error::last_os_error());
        }
        self.mmds = Some((MmdsStack::new(ip, store.clone()), timer));
        Ok(())
    }

    /// Arms the MMDS timer for the responder's next deadline.
    fn arm_mmds_timer(&mut self) {
        let Some((stack, timer)) = self.mmds.as_mut() else {
            return;
        };
        let result = match stack.poll_delay() {
            Some(delay) => timer.reset(delay.max(std::time::Duration::from_millis(1)), None),
            None => timer.clear(),
        };
        if let Err(e) = result {
            crate::warn_limited!("{}: cannot arm the MMDS timer: {e}", self.saved.id);
        }
    }

    /// The MMDS timer fired: run the responder, deliver what it has.
    fn mmds_timer_fired(&mut self) {
        if let Some((stack, timer)) = self.mmds.as_mut() {
            let _ = timer.wait();
            stack.poll();
        }
        self.arm_mmds_timer();
        self.receive();
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
                if let Some(frame) = self.mmds.as_mut().and_then(|(m, _)| m.pop_frame()) {
                    let n = VNET_HDR_LEN + frame.len();
                    if n > self.rx_buf.len() {
                        continue;
                    }
                    // No offloads: checksums are complete, no segmentation.
                    self.rx_buf[..VNET_HDR_LEN].fill(0);
                    self.rx_buf[VNET_HDR_LEN..n].copy_from_slice(&frame);
                    self.rx_pending = n;
                    self.stats.mmds_rx_frames.fetch_add(1, Ordering::Relaxed);
                }
            }
            if self.rx_pending == 0 {
                match self.backend.read_frame(&mut self.rx_buf) {
                    Ok(n) if n > VNET_HDR_LEN => self.rx_pending = n,
                    Ok(_) => continue, // runt: nothing to deliver
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        tracing::debug!("{} read failed: {e}", self.backend.name());
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
                    u32::try_from(n).unwrap_or(0)
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
        let mut detoured = false;
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
            let frame = gather(&active.mem, &descs, &mut self.tx_buf);
            let for_mmds = match (frame, self.mmds.as_mut()) {
                (Some(len), Some((stack, _))) => stack.detour(&self.tx_buf[VNET_HDR_LEN..len]),
                _ => false,
            };
            match frame {
                Some(_) if for_mmds => {
                    self.stats.mmds_tx_frames.fetch_add(1, Ordering::Relaxed);
                    detoured = true;
                }
                Some(len) => match self.backend.write_frame(&self.tx_buf[..len]) {
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
        if detoured {
            // Answers (ARP replies, TCP segments) wait in the responder: deliver them now.
            self.arm_mmds_timer();
            self.receive();
        }
    }
}

impl<B: NetBackend> VirtioDevice for Net<B> {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn config_space(&self) -> Arc<ConfigSpace> {
        self.config_space.clone()
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
        if let Err(e) = self.backend.set_offloads(offload) {
            crate::warn_limited!("{}: cannot set offloads: {e}", self.saved.id);
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
        let mut fds = vec![
            (self.backend.fd(), EventSet::IN | EventSet::EDGE_TRIGGERED),
            (self.rx_limiter.timer_fd(), EventSet::IN),
            (self.tx_limiter.timer_fd(), EventSet::IN),
        ];
        if let Some((_, timer)) = &self.mmds {
            fds.push((timer.as_raw_fd(), EventSet::IN));
        }
        fds
    }

    fn process_fd(&mut self, fd: RawFd) {
        if self.mmds.as_ref().is_some_and(|(_, t)| t.as_raw_fd() == fd) {
            self.mmds_timer_fired();
        } else if fd == self.backend.fd() {
            self.receive();
        } else if fd == self.rx_limiter.timer_fd() {
            self.rx_limiter.timer_fired();
            self.receive();
        } else if fd == self.tx_limiter.timer_fd() {
            self.tx_limiter.timer_fired();
            self.transmit();
        }
    }

    fn saved_config(&self) -> serde_json::Value {
        to_saved(&self.saved)
    }

    fn save_state(&self) -> serde_json::Value {
        to_saved(&NetState {
            pending_rx: self.rx_buf[..self.rx_pending].to_vec(),
            rx_limiter: self.rx_limiter.budget(),
            tx_limiter: self.tx_limiter.budget(),
        })
    }

    fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), DeviceError> {
        let state: NetState = from_saved(KIND.name, state)?;
        let n = state.pending_rx.len();
        if n > self.rx_buf.len() || (n != 0 && n <= VNET_HDR_LEN) {
            return Err(DeviceError::SavedState(
                KIND.name,
                format!("pending frame of {n} bytes"),
            ));
        }
        self.rx_buf[..n].copy_from_slice(&state.pending_rx);
        self.rx_pending = n;
        self.rx_limiter.set_budget(&state.rx_limiter);
        self.tx_limiter.set_budget(&state.tx_limiter);
        Ok(())
    }

    fn metrics(&self, out: &mut Vec<Sample>) {
        let s = &self.stats;
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let frames = (
            "flick_net_frames_total",
            "Frames moved by virtio-net, by interface and direction.",
        );
        counters(
            out,
            frames,
            "direction",
            &[("rx", n(&s.rx_frames)), ("tx", n(&s.tx_frames))],
        );
        let bytes = (
            "flick_net_bytes_total",
            "Payload bytes moved by virtio-net, by interface and direction.",
        );
        counters(
            out,
            bytes,
            "direction",
            &[("rx", n(&s.rx_bytes)), ("tx", n(&s.tx_bytes))],
        );
        let dropped = (
            "flick_net_dropped_frames_total",
            "Frames that could not be delivered (rx) or were refused or failed (tx).",
        );
        let dropped_values = [("rx", n(&s.rx_dropped)), ("tx", n(&s.tx_dropped))];
        counters(out, dropped, "direction", &dropped_values);
        let mmds = (
            "flick_net_mmds_frames_total",
            "Frames exchanged with MMDS instead of the backend, by interface and direction.",
        );
        counters(
            out,
            mmds,
            "direction",
            &[("rx", n(&s.mmds_rx_frames)), ("tx", n(&s.mmds_tx_frames))],
        );
        out.push(Sample::counter(
            "flick_net_rx_waits_total",
            "Times the receive path waited for the guest to post buffers.",
            Vec::new(),
            n(&s.rx_waits),
        ));
        let throttled = [
            ("rx", self.rx_limiter.throttled),
            ("tx", self.tx_limiter.throttled),
        ];
        counters(out, THROTTLED, "queue", &throttled);
    }

    fn update(&mut self, update: &DeviceUpdate) -> Result<bool, DeviceError> {
        let DeviceUpdate::Net(update) = update else {
            return Err(DeviceError::WrongUpdate(KIND.name));
        };
        if let Some(rx) = &update.rx_rate_limiter {
            self.rx_limiter.update(Some(rx));
            self.saved.rx_limits = SavedLimits::from(Some(rx));
        }
        if let Some(tx) = &update.tx_rate_limiter {
            self.tx_limiter.update(Some(tx));
            self.saved.tx_limits = SavedLimits::from(Some(tx));
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::os::fd::AsRawFd;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    const F_WRITE: u16 = 2;
    const RX_RING: u64 = 0;
    const TX_RING: u64 = 0x8000;
    const BUFFERS: u64 = 0x10_0000;

    /// A backend that hands out queued frames and records what it was given.
    #[derive(Default)]
    struct Fake {
        incoming: VecDeque<Vec<u8>>,
        written: Vec<Vec<u8>>,
        offloads: Option<u32>,
        fd: Option<EventFd>,
    }

    impl NetBackend for Fake {
        fn read_frame(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let frame = self
                .incoming
                .pop_front()
                .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::WouldBlock))?;
            buf[..frame.len()].copy_from_slice(&frame);
            Ok(frame.len())
        }
        fn write_frame(&mut self, frame: &[u8]) -> std::io::Result<usize> {
            self.written.push(frame.to_vec());
            Ok(frame.len())
        }
        fn set_offloads(&mut self, flags: u32) -> std::io::Result<()> {
            self.offloads = Some(flags);
            Ok(())
        }
        fn fd(&self) -> RawFd {
            self.fd.as_ref().map_or(-1, |e| e.as_raw_fd())
        }
        fn name(&self) -> &str {
            "fake"
        }
    }

    fn big_mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap()
    }

    fn saved() -> SavedNet {
        SavedNet {
            id: "eth0".into(),
            tap: "fake".into(),
            mac: None,
            mtu: None,
            rx_limits: SavedLimits::default(),
            tx_limits: SavedLimits::default(),
            mmds: None,
        }
    }

    fn frame(tag: u8, payload: usize) -> Vec<u8> {
        let mut f = vec![0u8; VNET_HDR_LEN];
        f.extend(std::iter::repeat_n(tag, payload));
        f
    }

    /// A device on `fake`, activated with empty rx and tx rings.
    fn active_net<'m>(
        mem: &'m GuestMemoryMmap,
        fake: Fake,
        tx_limiter: RateLimiter,
    ) -> (
        Net<Fake>,
        MockSplitQueue<'m, GuestMemoryMmap>,
        MockSplitQueue<'m, GuestMemoryMmap>,
    ) {
        let rx = MockSplitQueue::create(mem, GuestAddress(RX_RING), 16);
        let tx = MockSplitQueue::create(mem, GuestAddress(TX_RING), 16);
        let limiters = (RateLimiter::new(None).unwrap(), tx_limiter);
        let mut net = Net::new(saved(), fake, limiters);
        let activation = Activation {
            mem: mem.clone(),
            queues: vec![rx.create_queue().unwrap(), tx.create_queue().unwrap()],
            acked_features: F_GUEST_CSUM,
            interrupt: Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap())),
        };
        net.activate(activation).unwrap();
        (net, rx, tx)
    }

    fn used_idx(mem: &GuestMemoryMmap, queue: &MockSplitQueue<'_, GuestMemoryMmap>) -> u16 {
        mem.read_obj::<u16>(queue.used_addr().unchecked_add(2))
            .unwrap()
    }

    fn post_rx_buffers(queue: &MockSplitQueue<'_, GuestMemoryMmap>, count: u16, offset: u16) {
        let descs: Vec<RawDescriptor> = (0..count)
            .map(|i| {
                let addr = BUFFERS + u64::from(offset + i) * 0x1000;
                RawDescriptor::from(Descriptor::new(addr, 0x1000, F_WRITE, 0))
            })
            .collect();
        queue.add_desc_chains(&descs, offset).unwrap();
    }

    use vm_memory::Address;

    #[test]
    fn frames_wait_for_guest_buffers_then_arrive_in_order() {
        let mem = big_mem();
        let fake = Fake {
            incoming: [frame(1, 60), frame(2, 70)].into(),
            ..Fake::default()
        };
        let (mut net, rx, _tx) = active_net(&mem, fake, RateLimiter::new(None).unwrap());
        assert_eq!(net.backend.offloads, Some(tap::TUN_F_CSUM));
        assert_eq!(
            net.stats.rx_waits.load(Ordering::Relaxed),
            1,
            "no buffer yet"
        );
        assert_eq!(
            net.rx_pending,
            frame(1, 60).len(),
            "the frame is held, not dropped"
        );

        post_rx_buffers(&rx, 2, 0);
        net.process_queue(RX);

        assert_eq!(used_idx(&mem, &rx), 2);
        assert_eq!(net.stats.rx_frames.load(Ordering::Relaxed), 2);
        assert_eq!(net.stats.rx_dropped.load(Ordering::Relaxed), 0);
        let mut first = [0u8; 1];
        mem.read_slice(&mut first, GuestAddress(BUFFERS + VNET_HDR_LEN as u64))
            .unwrap();
        let mut second = [0u8; 1];
        mem.read_slice(
            &mut second,
            GuestAddress(BUFFERS + 0x1000 + VNET_HDR_LEN as u64),
        )
        .unwrap();
        assert_eq!((first[0], second[0]), (1, 2));
    }

    #[test]
    fn guest_frames_reach_the_backend_with_their_header() {
        let mem = big_mem();
        let (mut net, _rx, tx) = active_net(&mem, Fake::default(), RateLimiter::new(None).unwrap());
        mem.write_slice(&frame(7, 20), GuestAddress(BUFFERS))
            .unwrap();
        let desc = RawDescriptor::from(Descriptor::new(BUFFERS, 32, 0, 0));
        tx.add_desc_chains(&[desc], 0).unwrap();
        net.process_queue(TX);
        assert_eq!(net.backend.written, vec![frame(7, 20)]);
        assert_eq!(used_idx(&mem, &tx), 1);
        assert_eq!(net.stats.tx_bytes.load(Ordering::Relaxed), 20);
    }

    #[test]
    fn throttled_transmit_rewinds_and_resumes_when_the_timer_fires() {
        let mem = big_mem();
        let one_per_ms = crate::config::RateLimiterConfig {
            bandwidth: None,
            ops: Some(crate::config::TokenBucketConfig {
                size: 1,
                refill_time: 1,
                one_time_burst: None,
            }),
        };
        let limiter = RateLimiter::new(Some(&one_per_ms)).unwrap();
        let (mut net, _rx, tx) = active_net(&mem, Fake::default(), limiter);
        for i in 0..2u16 {
            let addr = BUFFERS + u64::from(i) * 0x1000;
            mem.write_slice(&frame(9, 10), GuestAddress(addr)).unwrap();
            let desc = RawDescriptor::from(Descriptor::new(addr, 22, 0, 0));
            tx.add_desc_chains(&[desc], i).unwrap();
        }
        net.process_queue(TX);
        assert_eq!(
            net.backend.written.len(),
            1,
            "the second frame waits for tokens"
        );
        assert_eq!(used_idx(&mem, &tx), 1);
        assert_eq!(net.tx_limiter.throttled, 1);

        std::thread::sleep(std::time::Duration::from_millis(5));
        let timer = net.tx_limiter.timer_fd();
        net.process_fd(timer);
        assert_eq!(net.backend.written.len(), 2);
        assert_eq!(used_idx(&mem, &tx), 2);
    }

    #[test]
    fn a_held_frame_survives_save_and_restore() {
        let mem = big_mem();
        let fake = Fake {
            incoming: [frame(5, 40)].into(),
            ..Fake::default()
        };
        let (net, _rx, _tx) = active_net(&mem, fake, RateLimiter::new(None).unwrap());
        let state = net.save_state();

        let mem2 = big_mem();
        let (mut restored, rx2, _tx2) =
            active_net(&mem2, Fake::default(), RateLimiter::new(None).unwrap());
        restored.restore_state(&state).unwrap();
        post_rx_buffers(&rx2, 1, 0);
        restored.process_queue(RX);
        assert_eq!(used_idx(&mem2, &rx2), 1);
        let mut byte = [0u8; 1];
        mem2.read_slice(&mut byte, GuestAddress(BUFFERS + VNET_HDR_LEN as u64))
            .unwrap();
        assert_eq!(byte[0], 5);
    }

    #[test]
    fn a_saved_state_with_a_runt_frame_is_refused() {
        let mem = big_mem();
        let (mut net, _rx, _tx) =
            active_net(&mem, Fake::default(), RateLimiter::new(None).unwrap());
        let bad = serde_json::json!({"pending_rx": "0011", "rx_limiter": {}, "tx_limiter": {}});
        assert!(net.restore_state(&bad).is_err());
    }

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
    mod mmds {
        use super::*;
        use crate::config::MmdsVersion;
        use crate::mmds::stack::tests::{self as guest, Client, GUEST_MAC};

        const TX_BUFFERS: u64 = BUFFERS + 0x8_0000;

        /// A device with MMDS enabled, 30 receive buffers posted, and what the guest has taken.
        struct Guest<'m> {
            mem: &'m GuestMemoryMmap,
            net: Net<Fake>,
            rx: MockSplitQueue<'m, GuestMemoryMmap>,
            tx: MockSplitQueue<'m, GuestMemoryMmap>,
            sent: u16,
            taken: u16,
        }

        impl<'m> Guest<'m> {
            fn new(mem: &'m GuestMemoryMmap, version: MmdsVersion) -> Self {
                // The mock's used ring overlaps the end of its available ring: a 64-entry
                // queue holds 32 chains safely.
                let rx = MockSplitQueue::create(mem, GuestAddress(RX_RING), 64);
                let tx = MockSplitQueue::create(mem, GuestAddress(TX_RING), 64);
                let limiters = (
                    RateLimiter::new(None).unwrap(),
                    RateLimiter::new(None).unwrap(),
                );
                let mut config = saved();
                config.mmds = Some(SavedMmds {
                    ipv4_address: guest::MMDS_IP,
                    version,
                    imds_compat: false,
                });
                let mut net = Net::new(config, Fake::default(), limiters);
                net.enable_mmds(&guest::store(version)).unwrap();
                let activation = Activation {
                    mem: mem.clone(),
                    queues: vec![rx.create_queue().unwrap(), tx.create_queue().unwrap()],
                    acked_features: F_GUEST_CSUM,
                    interrupt: Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap())),
                };
                net.activate(activation).unwrap();
                post_rx_buffers(&rx, 30, 0);
                Guest {
                    mem,
                    net,
                    rx,
                    tx,
                    sent: 0,
                    taken: 0,
                }
            }

            /// The guest transmits `frame` (an Ethernet frame).
            fn send(&mut self, frame: &[u8]) {
                assert!(self.sent < 30, "the mock ring holds 30 chains");
                let addr = TX_BUFFERS + u64::from(self.sent) * 0x1000;
                let mut bytes = vec![0u8; VNET_HDR_LEN];
                bytes.extend_from_slice(frame);
                self.mem.write_slice(&bytes, GuestAddress(addr)).unwrap();
                let len = u32::try_from(bytes.len()).unwrap();
                let desc = RawDescriptor::from(Descriptor::new(addr, len, 0, 0));
                self.tx.add_desc_chains(&[desc], self.sent).unwrap();
                self.sent += 1;
                self.net.process_queue(TX);
            }

            /// Ethernet frames the device delivered since the last call.
            fn received(&mut self) -> Vec<Vec<u8>> {
                let mut frames = Vec::new();
                while self.taken < used_idx(self.mem, &self.rx) {
                    let elem = self
                        .rx
                        .used_addr()
                        .unchecked_add(4 + 8 * u64::from(self.taken));
                    let id: u32 = self.mem.read_obj(elem).unwrap();
                    let len: u32 = self.mem.read_obj(elem.unchecked_add(4)).unwrap();
                    let mut frame = vec![0u8; len as usize];
                    let addr = BUFFERS + u64::from(id) * 0x1000;
                    self.mem.read_slice(&mut frame, GuestAddress(addr)).unwrap();
                    frames.push(frame[VNET_HDR_LEN..].to_vec());
                    self.taken += 1;
                }
                frames
            }

            /// Runs `client` against the device until both are quiet.
            fn exchange(&mut self, client: &mut Client) {
                for _ in 0..20 {
                    let out = client.frames();
                    let mut moved = !out.is_empty();
                    for f in out {
                        self.send(&f);
                    }
                    for f in self.received() {
                        client.deliver(&f);
                        moved = true;
                    }
                    if !moved {
                        return;
                    }
                }
            }
        }

        #[test]
        fn arp_for_mmds_is_answered_and_never_reaches_the_backend() {
            let mem = big_mem();
            let mut g = Guest::new(&mem, MmdsVersion::V1);
            g.send(&guest::arp_request(guest::MMDS_IP));
            let replies = g.received();
            assert_eq!(replies.len(), 1);
            assert_eq!(&replies[0][..6], &GUEST_MAC);
            assert!(g.net.backend.written.is_empty());
            assert_eq!(g.net.stats.mmds_tx_frames.load(Ordering::Relaxed), 1);
        }

        #[test]
        fn frames_for_other_addresses_reach_the_backend_untouched() {
            let mem = big_mem();
            let mut g = Guest::new(&mem, MmdsVersion::V1);
            let arp = guest::arp_request(std::net::Ipv4Addr::new(169, 254, 0, 1));
            g.send(&arp);
            let mut expected = vec![0u8; VNET_HDR_LEN];
            expected.extend_from_slice(&arp);
            assert_eq!(g.net.backend.written, vec![expected]);
            assert!(g.received().is_empty());
        }

        #[test]
        fn a_guest_fetches_metadata_over_tcp() {
            let mem = big_mem();
            let mut g = Guest::new(&mem, MmdsVersion::V1);
            let mut client = Client::connect(80);
            g.exchange(&mut client);
            let request = "GET /latest/meta-data/ami-id HTTP/1.1\r\nConnection: close\r\n\r\n";
            client.socket().send_slice(request.as_bytes()).unwrap();
            g.exchange(&mut client);
            let text = client.received();
            assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
            assert!(text.ends_with("ami-1"), "{text}");
            assert!(g.net.backend.written.is_empty(), "nothing went to the TAP");
        }

        #[test]
        fn v2_without_a_token_gets_401_over_tcp() {
            let mem = big_mem();
            let mut g = Guest::new(&mem, MmdsVersion::V2);
            let mut client = Client::connect(80);
            g.exchange(&mut client);
            client
                .socket()
                .send_slice(b"GET /latest HTTP/1.1\r\n\r\n")
                .unwrap();
            g.exchange(&mut client);
            let text = client.received();
            assert!(text.starts_with("HTTP/1.1 401 Unauthorized\r\n"), "{text}");
        }

        #[test]
        fn mmds_settings_survive_save_and_describe() {
            let mut config = saved();
            config.mmds = Some(SavedMmds {
                ipv4_address: guest::MMDS_IP,
                version: MmdsVersion::V2,
                imds_compat: true,
            });
            let mut vm = VmConfig::default();
            describe_net(&to_saved(&config), &mut vm).unwrap();
            let mmds = vm.mmds_config.unwrap();
            assert_eq!(mmds.network_interfaces, vec!["eth0".to_string()]);
            assert_eq!((mmds.version, mmds.imds_compat), (MmdsVersion::V2, true));
            assert_eq!(mmds.ipv4_address, Some(guest::MMDS_IP));
        }
    }
}
