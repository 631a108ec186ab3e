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

use serde::{Deserialize, Serialize};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};
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
