//! virtio-vsock (virtio spec 5.10) with Firecracker's host side: the guest's stream sockets are
//! bridged to unix sockets. A host process connects to `uds_path` and sends `CONNECT <port>\n`;
//! once the guest accepts, it reads `OK <host port>\n` and bytes flow both ways. A guest
//! connecting to CID 2 port P is connected to the listener at `<uds_path>_<P>`, or reset when
//! there is none.
//!
//! Three queues: receive (device → guest packets), transmit (guest → device) and event (the
//! transport reset sent after a snapshot restore, when every connection is gone). Packet layout
//! and checks are in `packet`, credit accounting per connection in `conn`, the host sockets and
//! connection table in `mux`. Malformed guest packets are dropped and counted, misbehaving
//! connections reset; nothing a guest sends grows host memory beyond the per-connection buffer
//! and the connection limit. Runs on the VMM thread.

mod conn;
mod host;
mod mux;
pub mod packet;

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::memory::GuestMemoryMmap;
use serde::{Deserialize, Serialize};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::Bytes;
use vmm_sys_util::epoll::EventSet;

use super::{
    from_saved, to_saved, ActivateError, Activation, ConfigSpace, DeviceError, DeviceKind,
    DeviceUpdate, Interrupt, NewDevice, Overrides, VirtioDevice, INT_VRING, VIRTIO_F_VERSION_1,
};
use crate::config::{VmConfig, VsockConfig};
use crate::metrics::{counters, Sample};
use mux::Mux;
pub use mux::VsockStats;
use packet::{PacketError, OP_RW};

/// virtio device type of a socket device (virtio spec 5.10).
pub const TYPE_VSOCK: u32 = 19;
const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
const EVENT: usize = 2;
/// `virtio_vsock_event.id` of a transport reset.
const EVENT_TRANSPORT_RESET: u32 = 0;
/// The id of the one vsock device.
const ID: &str = "vsock";

/// The vsock device kind, for the VMM's device registry.
pub const KIND: DeviceKind = DeviceKind {
    name: "vsock",
    noun: "vsock device",
    id_label: "device",
    open: open_vsock,
    reopen: reopen_vsock,
    describe: describe_vsock,
};

/// The device's settings as snapshots store them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct SavedVsock {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    vsock_id: Option<String>,
    guest_cid: u32,
    uds_path: String,
}

/// What a snapshot keeps of the device beyond its queues: nothing (connections do not survive
/// a snapshot; the restored guest is told with a transport reset).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
struct VsockState {}

fn new_device(saved: SavedVsock) -> Result<NewDevice, DeviceError> {
    let listener = host::listen(&saved.uds_path)
        .map_err(|e| DeviceError::VsockListen(saved.uds_path.clone(), e))?;
    let mux = Mux::new(u64::from(saved.guest_cid), &saved.uds_path, listener)
        .map_err(DeviceError::Epoll)?;
    Ok(NewDevice {
        id: ID.into(),
        device: Arc::new(Mutex::new(Vsock::new(saved, mux))),
        cmdline: Vec::new(),
    })
}

fn open_vsock(config: &VmConfig, _: Overrides<'_>) -> Result<Vec<NewDevice>, DeviceError> {
    let Some(vsock) = &config.vsock else {
        return Ok(Vec::new());
    };
    vsock.validate()?;
    let saved = SavedVsock {
        vsock_id: vsock.vsock_id.clone(),
        guest_cid: vsock.guest_cid,
        uds_path: vsock.uds_path.clone(),
    };
    Ok(vec![new_device(saved).map_err(|e| e.of(KIND.noun, ID))?])
}

fn reopen_vsock(saved: &serde_json::Value, over: Overrides<'_>) -> Result<NewDevice, DeviceError> {
    let mut saved: SavedVsock = from_saved(KIND.name, saved)?;
    if let Some(path) = over.vsock_uds_path {
        saved.uds_path = path.to_string();
    }
    new_device(saved).map_err(|e| e.of(KIND.noun, ID))
}

fn describe_vsock(saved: &serde_json::Value, config: &mut VmConfig) -> Result<(), DeviceError> {
    let saved: SavedVsock = from_saved(KIND.name, saved)?;
    config.vsock = Some(VsockConfig {
        vsock_id: saved.vsock_id,
        guest_cid: saved.guest_cid,
        uds_path: saved.uds_path,
    });
    Ok(())
}

struct Active {
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    interrupt: Arc<Interrupt>,
}

/// A virtio-vsock device.
pub struct Vsock {
    saved: SavedVsock,
    queue_sizes: [u16; 3],
    config_space: Arc<ConfigSpace>,
    active: Option<Active>,
    mux: Mux,
    /// A transport reset waits for an event buffer.
    reset_event_pending: bool,
    pub stats: Arc<VsockStats>,
}

impl std::fmt::Debug for Vsock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vsock")
            .field("guest_cid", &self.saved.guest_cid)
            .field("uds_path", &self.saved.uds_path)
            .finish_non_exhaustive()
    }
}

fn warn_packet(queue: &str, e: &PacketError) {
    crate::warn_limited!("vsock: dropped a malformed {queue} chain: {e}");
}

impl Vsock {
    fn new(saved: SavedVsock, mux: Mux) -> Self {
        let cid = u64::from(saved.guest_cid);
        Vsock {
            saved,
            queue_sizes: [QUEUE_SIZE; 3],
            config_space: ConfigSpace::new(cid.to_le_bytes().to_vec()),
            active: None,
            stats: mux.stats.clone(),
            mux,
            reset_event_pending: false,
        }
    }

    /// Takes the guest's packets while the receive path has room for the answers; returns
    /// whether a chain was completed.
    fn process_tx(&mut self) -> bool {
        let Some(active) = &mut self.active else {
            return false;
        };
        let (mem, queue) = (&active.mem, &mut active.queues[TX]);
        let mut completed = false;
        while !self.mux.control_full() {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let descs: Vec<Descriptor> = chain.take(packet::MAX_DESCS + 1).collect();
            match packet::read_tx(mem, &descs) {
                Ok(pkt) => self.mux.handle_guest_packet(pkt),
                Err(e) => {
                    self.stats.invalid_packets.fetch_add(1, Ordering::Relaxed);
                    warn_packet("transmit", &e);
                }
            }
            if queue.add_used(mem, head, 0).is_err() {
                break;
            }
            completed = true;
        }
        completed
    }

    /// Fills the guest's receive buffers with what the host side has for it; returns whether a
    /// chain was completed.
    fn process_rx(&mut self) -> bool {
        let Some(active) = &mut self.active else {
            return false;
        };
        let (mem, queue) = (&active.mem, &mut active.queues[RX]);
        let mut completed = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let descs: Vec<Descriptor> = chain.take(packet::MAX_DESCS + 1).collect();
            let used = match packet::rx_room(&descs) {
                Ok(room) => {
                    let Some(hdr) = self.mux.next_rx(room) else {
                        queue.go_to_previous_position();
                        break;
                    };
                    let len = usize::try_from(hdr.len).unwrap_or(0);
                    let payload = if hdr.op == OP_RW {
                        &self.mux.rx_buf[..len]
                    } else {
                        &[][..]
                    };
                    match packet::write_rx(mem, &descs, &hdr, payload) {
                        Ok(used) => {
                            self.stats.packets_to_guest.fetch_add(1, Ordering::Relaxed);
                            used
                        }
                        Err(e) => {
                            self.stats.invalid_packets.fetch_add(1, Ordering::Relaxed);
                            warn_packet("receive", &e);
                            if hdr.op == OP_RW {
                                // Its data is gone: the stream cannot continue.
                                self.mux.reset_conn((hdr.src_port, hdr.dst_port));
                            } else {
                                self.mux.requeue_front(hdr);
                            }
                            0
                        }
                    }
                }
                Err(e) => {
                    self.stats.invalid_packets.fetch_add(1, Ordering::Relaxed);
                    warn_packet("receive", &e);
                    0
                }
            };
            if queue.add_used(mem, head, used).is_err() {
                break;
            }
            completed = true;
        }
        completed
    }

    /// Tells the guest its connections are gone (after a snapshot restore).
    fn process_event(&mut self) -> bool {
        let Some(active) = &mut self.active else {
            return false;
        };
        if !self.reset_event_pending {
            return false;
        }
        let (mem, queue) = (&active.mem, &mut active.queues[EVENT]);
        let mut completed = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let first = chain.take(1).next();
            let written = first
                .filter(|d| d.is_write_only() && d.len() >= 4)
                .and_then(|d| {
                    mem.write_obj(EVENT_TRANSPORT_RESET.to_le(), d.addr())
                        .ok()
                        .map(|()| 4)
                });
            if queue.add_used(mem, head, written.unwrap_or(0)).is_err() {
                break;
            }
            completed = true;
            if written.is_some() {
                self.reset_event_pending = false;
                break;
            }
            self.stats.invalid_packets.fetch_add(1, Ordering::Relaxed);
        }
        completed
    }

    /// Moves packets both ways until neither side makes progress, then interrupts the guest
    /// once if any queue completed a chain.
    fn run(&mut self) {
        let mut notify = [false; 3];
        notify[EVENT] = self.process_event();
        // Guest packets wait while the answers for it are backed up; each pass frees room.
        for _ in 0..4 {
            notify[TX] |= self.process_tx();
            let blocked = self.mux.control_full();
            let rx = self.process_rx();
            notify[RX] |= rx;
            if !(blocked && rx) {
                break;
            }
        }
        let Some(active) = &mut self.active else {
            return;
        };
        let mut wanted = false;
        for (queue, done) in active.queues.iter_mut().zip(notify) {
            wanted |= done && queue.needs_notification(&active.mem).unwrap_or(true);
        }
        if wanted {
            active.interrupt.raise(INT_VRING);
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn config_space(&self) -> Arc<ConfigSpace> {
        self.config_space.clone()
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let found = activation.queues.len();
        if found != 3 {
            return Err(ActivateError::QueueCount { expected: 3, found });
        }
        self.active = Some(Active {
            mem: activation.mem,
            queues: activation.queues,
            interrupt: activation.interrupt,
        });
        Ok(())
    }

    fn is_active(&self) -> bool {
        self.active.is_some()
    }

    fn reset(&mut self) {
        self.active = None;
        self.mux.reset();
    }

    fn process_queue(&mut self, _index: usize) {
        self.run();
    }

    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        self.active
            .iter()
            .flat_map(|a| a.queues.iter().map(|q| q.state()))
            .collect()
    }

    fn event_fds(&self) -> Vec<(RawFd, EventSet)> {
        vec![(self.mux.epoll_fd(), EventSet::IN)]
    }

    fn process_fd(&mut self, fd: RawFd) {
        if fd == self.mux.epoll_fd() {
            self.mux.process_events(self.active.is_some());
            self.run();
        }
    }

    fn saved_config(&self) -> serde_json::Value {
        to_saved(&self.saved)
    }

    fn save_state(&self) -> serde_json::Value {
        to_saved(&VsockState {})
    }

    fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), DeviceError> {
        let _: VsockState = from_saved(KIND.name, state)?;
        self.mux.reset();
        self.reset_event_pending = true;
        Ok(())
    }

    fn metrics(&self, out: &mut Vec<Sample>) {
        let s = &self.stats;
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        counters(
            out,
            (
                "flick_vsock_connections_total",
                "vsock connections, by who opened them and how they ended up.",
            ),
            "event",
            &[
                ("host_opened", n(&s.host_connections)),
                ("guest_opened", n(&s.guest_connections)),
                ("host_refused", n(&s.host_refused)),
                ("guest_refused", n(&s.guest_refused)),
                ("reset", n(&s.resets)),
            ],
        );
        out.push(Sample::gauge(
            "flick_vsock_open_connections",
            "vsock connections open now.",
            Vec::new(),
            u64::try_from(self.mux.connection_count()).unwrap_or(0),
        ));
        counters(
            out,
            (
                "flick_vsock_bytes_total",
                "vsock stream bytes, by direction.",
            ),
            "direction",
            &[
                ("to_guest", n(&s.bytes_to_guest)),
                ("to_host", n(&s.bytes_to_host)),
            ],
        );
        counters(
            out,
            ("flick_vsock_packets_total", "vsock packets, by direction."),
            "direction",
            &[
                ("to_guest", n(&s.packets_to_guest)),
                ("from_guest", n(&s.packets_from_guest)),
            ],
        );
        counters(
            out,
            (
                "flick_vsock_errors_total",
                "Malformed guest packets dropped, credit overruns, host socket failures.",
            ),
            "kind",
            &[
                ("invalid_packet", n(&s.invalid_packets)),
                ("credit_overrun", n(&s.credit_overruns)),
                ("host", n(&s.host_errors)),
            ],
        );
    }

    fn update(&mut self, _: &DeviceUpdate) -> Result<bool, DeviceError> {
        Err(DeviceError::WrongUpdate(KIND.name))
    }
}

#[cfg(test)]
mod tests {
    use super::packet::*;
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixListener;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, GuestAddress};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    const F_WRITE: u16 = 2;
    const RINGS: [u64; 3] = [0x1_0000, 0x2_0000, 0x3_0000];
    const TX_PKT: u64 = 0x10_0000;
    const RX_BUFS: u64 = 0x20_0000;
    const GUEST_PORT: u32 = 1000;

    struct Rig<'m> {
        dir: std::path::PathBuf,
        dev: Vsock,
        mem: &'m GuestMemoryMmap,
        queues: Vec<MockSplitQueue<'m, GuestMemoryMmap>>,
        tx_next: u16,
        rx_seen: u16,
    }

    impl Drop for Rig<'_> {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn rig<'m>(mem: &'m GuestMemoryMmap, tag: &str) -> Rig<'m> {
        let dir = std::env::temp_dir().join(format!("flick-vsock-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let saved = SavedVsock {
            vsock_id: None,
            guest_cid: 3,
            uds_path: dir.join("v.sock").display().to_string(),
        };
        let listener = host::listen(&saved.uds_path).unwrap();
        let mux = Mux::new(3, &saved.uds_path, listener).unwrap();
        let mut dev = Vsock::new(saved, mux);
        let queues: Vec<_> = RINGS
            .iter()
            .map(|&at| MockSplitQueue::create(mem, GuestAddress(at), 32))
            .collect();
        dev.activate(Activation {
            mem: mem.clone(),
            queues: queues.iter().map(|q| q.create_queue().unwrap()).collect(),
            acked_features: VIRTIO_F_VERSION_1,
            interrupt: Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap())),
        })
        .unwrap();
        // Receive buffers: 16 of 4 KiB + header room.
        let rx: Vec<RawDescriptor> = (0..16u64)
            .map(|i| RawDescriptor::from(Descriptor::new(RX_BUFS + i * 0x2000, 0x2000, F_WRITE, 0)))
            .collect();
        queues[RX].add_desc_chains(&rx, 0).unwrap();
        Rig {
            dir,
            dev,
            mem,
            queues,
            tx_next: 0,
            rx_seen: 0,
        }
    }

    impl Rig<'_> {
        fn send(&mut self, op: u16, dst_port: u32, payload: &[u8]) {
            let flags = if op == OP_SHUTDOWN {
                SHUTDOWN_RCV | SHUTDOWN_SEND
            } else {
                0
            };
            let hdr = Header {
                flags,
                src_cid: 3,
                dst_cid: HOST_CID,
                src_port: GUEST_PORT,
                dst_port,
                len: u32::try_from(payload.len()).unwrap(),
                kind: TYPE_STREAM,
                op,
                buf_alloc: 64 * 1024,
                ..Header::default()
            };
            self.mem
                .write_slice(&hdr.to_bytes(), GuestAddress(TX_PKT))
                .unwrap();
            self.mem
                .write_slice(payload, GuestAddress(TX_PKT + HDR_LEN as u64))
                .unwrap();
            let len = u32::try_from(HDR_LEN + payload.len()).unwrap();
            let desc = RawDescriptor::from(Descriptor::new(TX_PKT, len, 0, 0));
            self.send_chain(&[desc]);
        }

        fn send_chain(&mut self, descs: &[RawDescriptor]) {
            self.queues[TX]
                .add_desc_chains(descs, self.tx_next)
                .unwrap();
            self.tx_next += u16::try_from(descs.len()).unwrap();
            self.dev.process_queue(TX);
        }

        fn used(&self, queue: usize) -> u16 {
            let q = &self.queues[queue];
            self.mem
                .read_obj::<u16>(q.used_addr().unchecked_add(2))
                .unwrap()
        }

        /// Packets the device put in the receive queue since the last call.
        fn received(&mut self) -> Vec<(Header, Vec<u8>)> {
            let mut out = Vec::new();
            let q = &self.queues[RX];
            while self.rx_seen < self.used(RX) {
                let elem = q.used_addr().unchecked_add(4 + 8 * u64::from(self.rx_seen));
                let id: u32 = self.mem.read_obj(elem).unwrap();
                let len: u32 = self.mem.read_obj(elem.unchecked_add(4)).unwrap();
                let at = GuestAddress(RX_BUFS + u64::from(id) * 0x2000);
                let mut raw = [0u8; HDR_LEN];
                self.mem.read_slice(&mut raw, at).unwrap();
                let hdr = Header::from_bytes(&raw);
                let mut payload = vec![0u8; usize::try_from(hdr.len).unwrap()];
                self.mem
                    .read_slice(&mut payload, at.unchecked_add(HDR_LEN as u64))
                    .unwrap();
                assert_eq!(len as usize, HDR_LEN + payload.len());
                out.push((hdr, payload));
                self.rx_seen += 1;
            }
            out
        }

        fn host_events(&mut self) {
            let fd = self.dev.mux.epoll_fd();
            self.dev.process_fd(fd);
        }

        fn listener(&self, port: u32) -> UnixListener {
            UnixListener::bind(format!("{}_{port}", self.dev.saved.uds_path)).unwrap()
        }
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap()
    }

    #[test]
    fn guest_connection_gets_a_response_and_bytes_flow_both_ways() {
        let mem = mem();
        let mut rig = rig(&mem, "flow");
        let listener = rig.listener(52);
        rig.send(OP_REQUEST, 52, b"");
        let got = rig.received();
        assert_eq!(got.len(), 1);
        let (hdr, _) = got[0];
        assert_eq!(
            (hdr.op, hdr.src_port, hdr.dst_port),
            (OP_RESPONSE, 52, GUEST_PORT)
        );
        assert_eq!((hdr.buf_alloc, hdr.dst_cid), (conn::TX_BUF_SIZE, 3));

        let (mut host, _) = listener.accept().unwrap();
        rig.send(OP_RW, 52, b"to host");
        let mut buf = [0u8; 7];
        host.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"to host");

        host.write_all(b"to guest").unwrap();
        rig.host_events();
        let got = rig.received();
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(
            (got[0].0.op, got[0].1.as_slice()),
            (OP_RW, &b"to guest"[..])
        );
        assert_eq!(rig.dev.stats.bytes_to_host.load(Ordering::Relaxed), 7);
    }

    #[test]
    fn data_the_guest_sent_before_closing_reaches_a_slow_host_reader() {
        let mem = mem();
        let mut rig = rig(&mem, "drain");
        let listener = rig.listener(52);
        rig.send(OP_REQUEST, 52, b"");
        rig.received();
        // Until the host socket is full and the device holds some of it (within the credit).
        let chunk = vec![9u8; MAX_PAYLOAD];
        let mut chunks = 0;
        while rig.dev.mux.pending_tx() == 0 {
            rig.send(OP_RW, 52, &chunk);
            chunks += 1;
            assert!(chunks < 24, "the host socket never filled");
        }
        rig.send(OP_SHUTDOWN, 52, b"");
        let pending = rig.received();
        assert!(pending.iter().all(|(h, _)| h.op != OP_RST), "{pending:?}");
        let (mut host, _) = listener.accept().unwrap();
        host.set_nonblocking(true).unwrap();
        let mut total = 0usize;
        let mut buf = vec![0u8; MAX_PAYLOAD];
        loop {
            match host.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => total += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => rig.host_events(),
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(total, chunks * MAX_PAYLOAD);
        assert!(rig.received().iter().any(|(h, _)| h.op == OP_RST));
        assert_eq!(rig.dev.mux.connection_count(), 0);
    }

    #[test]
    fn guest_request_with_no_listener_is_reset() {
        let mem = mem();
        let mut rig = rig(&mem, "refused");
        rig.send(OP_REQUEST, 99, b"");
        let got = rig.received();
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].0.op, got[0].0.dst_port), (OP_RST, GUEST_PORT));
        assert_eq!(rig.dev.stats.guest_refused.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_guest_sending_past_its_credit_is_reset_and_buffers_stay_bounded() {
        let mem = mem();
        let mut rig = rig(&mem, "overrun");
        let _listener = rig.listener(52); // accepted by the kernel, never read
        rig.send(OP_REQUEST, 52, b"");
        rig.received();
        let chunk = vec![5u8; MAX_PAYLOAD];
        let mut reset = false;
        for _ in 0..20 {
            rig.send(OP_RW, 52, &chunk);
            if rig.received().iter().any(|(h, _)| h.op == OP_RST) {
                reset = true;
                break;
            }
        }
        assert!(reset, "20 x 64 KiB never overran a 256 KiB credit");
        assert_eq!(rig.dev.stats.credit_overruns.load(Ordering::Relaxed), 1);
        assert_eq!(rig.dev.mux.connection_count(), 0);
    }

    #[test]
    fn malformed_and_misaddressed_packets_are_dropped_without_answers() {
        let mem = mem();
        let mut rig = rig(&mem, "hostile");
        let writable = RawDescriptor::from(Descriptor::new(TX_PKT, 64, F_WRITE, 0));
        let empty = RawDescriptor::from(Descriptor::new(TX_PKT, 0, 0, 0));
        let outside = RawDescriptor::from(Descriptor::new(0xfff_0000, 64, 0, 0));
        rig.send_chain(&[writable, empty, outside]);
        let wrong_cid = Header {
            src_cid: 9,
            dst_cid: HOST_CID,
            kind: TYPE_STREAM,
            op: OP_REQUEST,
            ..Header::default()
        };
        mem.write_slice(&wrong_cid.to_bytes(), GuestAddress(TX_PKT))
            .unwrap();
        rig.send_chain(&[RawDescriptor::from(Descriptor::new(TX_PKT, 44, 0, 0))]);
        assert_eq!(rig.used(TX), 4, "every chain is returned");
        assert!(rig.received().is_empty());
        assert_eq!(rig.dev.stats.invalid_packets.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn host_connect_gets_ok_once_the_guest_accepts() {
        let mem = mem();
        let mut rig = rig(&mem, "hostok");
        let mut host = std::os::unix::net::UnixStream::connect(&rig.dev.saved.uds_path).unwrap();
        host.write_all(b"CONNECT 52\nearly").unwrap();
        rig.host_events();
        let got = rig.received();
        assert_eq!(got.len(), 1, "{got:?}");
        let request = got[0].0;
        assert_eq!((request.op, request.dst_port), (OP_REQUEST, 52));
        assert_eq!(request.src_port, 1 << 30);
        // The guest accepts from its port 52.
        let accept = Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 52,
            dst_port: request.src_port,
            kind: TYPE_STREAM,
            op: OP_RESPONSE,
            buf_alloc: 4096,
            ..Header::default()
        };
        mem.write_slice(&accept.to_bytes(), GuestAddress(TX_PKT))
            .unwrap();
        rig.send_chain(&[RawDescriptor::from(Descriptor::new(TX_PKT, 44, 0, 0))]);
        let mut ok = [0u8; 14];
        host.read_exact(&mut ok).unwrap();
        assert_eq!(&ok, b"OK 1073741824\n");
        // Bytes sent after the CONNECT line, before the answer, reach the guest.
        let got = rig.received();
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!((got[0].0.op, got[0].1.as_slice()), (OP_RW, &b"early"[..]));
    }

    #[test]
    fn an_unanswered_host_connect_is_closed_after_the_timeout() {
        let mem = mem();
        let mut rig = rig(&mem, "timeout");
        let mut host = std::os::unix::net::UnixStream::connect(&rig.dev.saved.uds_path).unwrap();
        host.write_all(b"CONNECT 52\n").unwrap();
        rig.host_events();
        assert_eq!(rig.received()[0].0.op, OP_REQUEST);
        host.set_nonblocking(true).unwrap();
        let give_up = std::time::Instant::now() + mux::CONNECT_TIMEOUT * 5;
        let mut byte = [0u8; 1];
        loop {
            rig.host_events();
            match host.read(&mut byte) {
                Ok(0) => break,
                Ok(_) => panic!("an unanswered request got data"),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
            assert!(std::time::Instant::now() < give_up, "never closed");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let got = rig.received();
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].0.op, OP_RST);
        assert_eq!(rig.dev.mux.connection_count(), 0);
    }

    #[test]
    fn a_restored_device_tells_the_guest_its_transport_was_reset() {
        let mem = mem();
        let mut rig = rig(&mem, "restore");
        let event = RawDescriptor::from(Descriptor::new(0x30_0000, 8, F_WRITE, 0));
        mem.write_obj(0xffff_ffffu32, GuestAddress(0x30_0000))
            .unwrap();
        rig.queues[EVENT].add_desc_chains(&[event], 0).unwrap();
        rig.dev.process_queue(EVENT);
        assert_eq!(rig.used(EVENT), 0, "no event before a restore");
        rig.dev.restore_state(&serde_json::json!({})).unwrap();
        rig.dev.process_queue(EVENT);
        assert_eq!(rig.used(EVENT), 1);
        let id: u32 = mem.read_obj(GuestAddress(0x30_0000)).unwrap();
        assert_eq!(id, EVENT_TRANSPORT_RESET);
    }
}
