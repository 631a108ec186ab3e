//! The host side of the vsock device: the listener on `uds_path`, host streams waiting for their
//! `CONNECT <port>` line, and the connection table, all on one epoll instance of their own whose
//! fd the VMM thread's event loop watches (streams come and go without touching that loop).
//! Turns guest packets into host socket work and host socket readiness into packets for the
//! guest's receive queue. Runs on the VMM thread.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::conn::{Conn, ConnState, Key};
use super::host;
use super::packet::*;

/// Most connections at once; further requests are reset.
pub const MAX_CONNECTIONS: usize = 1024;
/// Most accepted host streams still sending their `CONNECT` line.
const MAX_HANDSHAKES: usize = 64;
/// Longest `CONNECT <port>\n` line.
const MAX_HANDSHAKE_LINE: usize = 32;
/// Control packets for the guest beyond which the device stops taking guest packets.
pub const MAX_CONTROL: usize = 1024;
/// First port the host side uses for host-initiated connections.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// How long a host-initiated connection waits for the guest to accept or refuse it, and a
/// connection the guest closed waits for the host stream to take what it still holds.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Epoll tokens of the listener and the connect timer (streams use their fd).
const LISTENER: u64 = u64::MAX;
/// How long the listener rests after a failed accept.
const LISTENER_PAUSE: Duration = Duration::from_millis(100);
const TIMER: u64 = u64::MAX - 1;

/// Counters of the device, read by the metrics code.
#[derive(Debug, Default)]
pub struct VsockStats {
    pub host_connections: AtomicU64,
    pub guest_connections: AtomicU64,
    /// Guest connection requests with no listener at `<uds_path>_<port>`.
    pub guest_refused: AtomicU64,
    /// Host connections closed: bad `CONNECT` line, device not ready, or the guest refused.
    pub host_refused: AtomicU64,
    /// Connections ended by a reset either way.
    pub resets: AtomicU64,
    pub bytes_to_guest: AtomicU64,
    pub bytes_to_host: AtomicU64,
    pub packets_to_guest: AtomicU64,
    pub packets_from_guest: AtomicU64,
    /// Guest packets dropped: malformed chains, wrong CIDs.
    pub invalid_packets: AtomicU64,
    /// Connections reset because the guest sent more than its credit.
    pub credit_overruns: AtomicU64,
    /// Host-side socket failures (accept, connect other than refused).
    pub host_errors: AtomicU64,
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

fn add(c: &AtomicU64, n: usize) {
    c.fetch_add(u64::try_from(n).unwrap_or(0), Ordering::Relaxed);
}

/// An accepted host stream before its `CONNECT` line is complete.
#[derive(Debug)]
struct Handshake {
    stream: OwnedFd,
    line: Vec<u8>,
}

/// What a finished handshake line asks for.
fn parse_connect(line: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(line).ok()?;
    let port = text
        .trim_end_matches(['\r', '\n'])
        .strip_prefix("CONNECT ")?;
    port.trim().parse().ok()
}

#[derive(Debug)]
pub struct Mux {
    guest_cid: u64,
    uds_path: String,
    listener: OwnedFd,
    epoll: Epoll,
    conns: HashMap<Key, Conn>,
    by_fd: HashMap<RawFd, Key>,
    handshakes: HashMap<RawFd, Handshake>,
    control: VecDeque<Header>,
    /// Connections that may have host data for the guest, in turn.
    rx_ready: VecDeque<Key>,
    next_local_port: u32,
    /// Fires when the oldest unanswered host-initiated request times out.
    timer: TimerFd,
    timer_armed: bool,
    /// The listener is out of the epoll set after a failed accept (out of fds), until the
    /// timer fires: a listener that stays readable must not spin the VMM thread.
    listener_paused: bool,
    pub rx_buf: Vec<u8>,
    pub stats: Arc<VsockStats>,
}

impl Mux {
    pub fn new(guest_cid: u64, uds_path: &str, listener: OwnedFd) -> io::Result<Mux> {
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, LISTENER),
        )?;
        let timer = TimerFd::new()?;
        epoll.ctl(
            ControlOperation::Add,
            timer.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TIMER),
        )?;
        Ok(Mux {
            guest_cid,
            uds_path: uds_path.to_string(),
            listener,
            epoll,
            conns: HashMap::new(),
            by_fd: HashMap::new(),
            handshakes: HashMap::new(),
            control: VecDeque::new(),
            rx_ready: VecDeque::new(),
            next_local_port: FIRST_LOCAL_PORT,
            timer,
            timer_armed: false,
            listener_paused: false,
            rx_buf: vec![0; MAX_PAYLOAD],
            stats: Arc::new(VsockStats::default()),
        })
    }

    /// The fd the VMM thread's event loop watches.
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Guest bytes waiting for host streams, over all connections.
    #[cfg(test)]
    pub fn pending_tx(&self) -> usize {
        self.conns.values().map(Conn::pending_tx).sum()
    }

    /// Whether the guest must drain its receive queue before more of its packets are taken.
    pub fn control_full(&self) -> bool {
        self.control.len() >= MAX_CONTROL
    }

    /// Closes every connection and host stream (device reset, snapshot restore).
    pub fn reset(&mut self) {
        let keys: Vec<Key> = self.conns.keys().copied().collect();
        for key in keys {
            self.remove(key);
        }
        let fds: Vec<RawFd> = self.handshakes.keys().copied().collect();
        for fd in fds {
            self.drop_handshake(fd);
        }
        self.control.clear();
        self.rx_ready.clear();
    }

    fn watch(&self, fd: RawFd) -> io::Result<()> {
        let set = EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED;
        let token = u64::try_from(fd).unwrap_or(u64::MAX - 2);
        self.epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(set, token))
    }

    fn unwatch(&self, fd: RawFd) {
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
    }

    fn remove(&mut self, key: Key) {
        if let Some(conn) = self.conns.remove(&key) {
            self.by_fd.remove(&conn.fd());
            self.unwatch(conn.fd());
        }
    }

    fn drop_handshake(&mut self, fd: RawFd) {
        if self.handshakes.remove(&fd).is_some() {
            self.unwatch(fd);
        }
    }

    fn push_control(&mut self, hdr: Header) {
        self.control.push_back(hdr);
    }

    /// Resets connection `key`: the guest gets a RST, the host stream is closed.
    pub fn reset_conn(&mut self, key: Key) {
        if let Some(mut conn) = self.conns.remove(&key) {
            let hdr = conn.header(self.guest_cid, OP_RST);
            self.by_fd.remove(&conn.fd());
            self.unwatch(conn.fd());
            self.push_control(hdr);
            inc(&self.stats.resets);
        }
    }

    fn queue_rx(&mut self, key: Key) {
        if let Some(conn) = self.conns.get_mut(&key) {
            if !conn.rx_queued && conn.wants_rx() {
                conn.rx_queued = true;
                self.rx_ready.push_back(key);
            }
        }
    }

    /// Handles one packet the guest sent.
    pub fn handle_guest_packet(&mut self, pkt: TxPacket) {
        let hdr = pkt.hdr;
        inc(&self.stats.packets_from_guest);
        if hdr.src_cid != self.guest_cid || hdr.dst_cid != HOST_CID {
            inc(&self.stats.invalid_packets);
            crate::warn_limited!(
                "vsock: dropped a guest packet from CID {} to CID {} (guest CID is {})",
                hdr.src_cid,
                hdr.dst_cid,
                self.guest_cid
            );
            return;
        }
        if hdr.kind != TYPE_STREAM {
            inc(&self.stats.invalid_packets);
            crate::warn_limited!("vsock: guest packet of unsupported type {}", hdr.kind);
            if hdr.op != OP_RST {
                self.push_control(hdr.reset_reply(self.guest_cid));
            }
            return;
        }
        let key = (hdr.dst_port, hdr.src_port);
        if !self.conns.contains_key(&key) {
            match hdr.op {
                OP_REQUEST => self.guest_connect(&hdr),
                OP_RST => {}
                _ => self.push_control(hdr.reset_reply(self.guest_cid)),
            }
            return;
        }
        self.connection_packet(key, hdr, &pkt.payload);
    }

    /// A packet for an existing connection; its credit fields may let host data flow again.
    fn connection_packet(&mut self, key: Key, hdr: Header, payload: &[u8]) {
        self.connection_op(key, hdr, payload);
        self.queue_rx(key);
    }

    fn connection_op(&mut self, key: Key, hdr: Header, payload: &[u8]) {
        let guest_cid = self.guest_cid;
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        conn.update_peer_credit(&hdr);
        match (conn.state, hdr.op) {
            (_, OP_RST) => {
                self.remove(key);
                inc(&self.stats.resets);
            }
            (ConnState::Requesting, OP_RESPONSE) => {
                conn.state = ConnState::Established;
                let line = format!("OK {}\n", conn.local_port);
                match host::send(conn.fd(), line.as_bytes()) {
                    Ok(n) if n == line.len() => inc(&self.stats.host_connections),
                    _ => self.reset_conn(key),
                }
            }
            (ConnState::Established, OP_RW) => match conn.push_guest_data(payload) {
                Ok(Ok(())) => {
                    add(&self.stats.bytes_to_host, payload.len());
                    if conn.credit_update_due() {
                        let update = conn.header(guest_cid, OP_CREDIT_UPDATE);
                        self.push_control(update);
                    }
                }
                Ok(Err(_)) => self.reset_conn(key),
                Err(overrun) => {
                    inc(&self.stats.credit_overruns);
                    crate::warn_limited!("vsock: resetting port {}: {overrun}", key.0);
                    self.reset_conn(key);
                }
            },
            (ConnState::Established, OP_CREDIT_UPDATE) => {}
            (ConnState::Established, OP_CREDIT_REQUEST) => {
                let update = conn.header(guest_cid, OP_CREDIT_UPDATE);
                self.push_control(update);
            }
            (ConnState::Established, OP_SHUTDOWN) => {
                let both = SHUTDOWN_RCV | SHUTDOWN_SEND;
                if hdr.flags & both == both {
                    // The guest closed: finish once what it sent reached the host stream
                    // (or after the timeout, if the host does not read it).
                    conn.peer_no_send = true;
                    conn.peer_no_rcv = true;
                    if conn.flush().is_err() || conn.pending_tx() == 0 {
                        self.reset_conn(key);
                    } else {
                        conn.closing_since = Some(Instant::now());
                        self.arm_timer(CONNECT_TIMEOUT);
                    }
                    return;
                }
                conn.peer_no_rcv |= hdr.flags & SHUTDOWN_RCV != 0;
                if hdr.flags & SHUTDOWN_SEND != 0 {
                    conn.peer_no_send = true;
                    if conn.flush().is_err() {
                        self.reset_conn(key);
                    }
                }
            }
            _ => {
                inc(&self.stats.invalid_packets);
                crate::warn_limited!(
                    "vsock: resetting port {}: unexpected op {} from the guest",
                    key.0,
                    hdr.op
                );
                self.reset_conn(key);
            }
        }
    }

    /// The guest connects to host port `hdr.dst_port`: `<uds_path>_<port>`.
    fn guest_connect(&mut self, hdr: &Header) {
        let refuse = hdr.reset_reply(self.guest_cid);
        if self.conns.len() >= MAX_CONNECTIONS {
            crate::warn_limited!("vsock: too many connections; refusing the guest's request");
            self.push_control(refuse);
            return;
        }
        let path = format!("{}_{}", self.uds_path, hdr.dst_port);
        let stream = match host::connect(&path) {
            Ok(stream) => stream,
            Err(e) => {
                inc(&self.stats.guest_refused);
                tracing::debug!("vsock: guest connection to {path} refused: {e}");
                self.push_control(refuse);
                return;
            }
        };
        if let Err(e) = self.watch(stream.as_raw_fd()) {
            inc(&self.stats.host_errors);
            crate::warn_limited!("vsock: cannot watch a host stream: {e}");
            self.push_control(refuse);
            return;
        }
        let key = (hdr.dst_port, hdr.src_port);
        let mut conn = Conn::new(stream, key, ConnState::Established);
        conn.update_peer_credit(hdr);
        let response = conn.header(self.guest_cid, OP_RESPONSE);
        self.by_fd.insert(conn.fd(), key);
        self.conns.insert(key, conn);
        self.push_control(response);
        inc(&self.stats.guest_connections);
    }

    /// Handles what the epoll instance reports; `active` tells whether the guest driver runs.
    pub fn process_events(&mut self, active: bool) {
        let mut events = [EpollEvent::default(); 32];
        loop {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    crate::warn_limited!("vsock: epoll wait failed: {e}");
                    return;
                }
            };
            for event in &events[..n] {
                let set = EventSet::from_bits_truncate(event.events);
                if event.data() == LISTENER {
                    self.accept_all(active);
                } else if event.data() == TIMER {
                    self.on_timer();
                } else if let Ok(fd) = RawFd::try_from(event.data()) {
                    self.stream_event(fd, set, active);
                }
            }
            if n < events.len() {
                return;
            }
        }
    }

    fn accept_all(&mut self, active: bool) {
        loop {
            let stream = match host::accept(self.listener.as_raw_fd()) {
                Ok(stream) => stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    inc(&self.stats.host_errors);
                    crate::warn_limited!("vsock: accept on {} failed: {e}", self.uds_path);
                    self.unwatch(self.listener.as_raw_fd());
                    self.listener_paused = true;
                    self.arm_timer(LISTENER_PAUSE);
                    return;
                }
            };
            let full =
                self.handshakes.len() >= MAX_HANDSHAKES || self.conns.len() >= MAX_CONNECTIONS;
            if !active || full {
                inc(&self.stats.host_refused);
                continue; // dropping the stream closes it
            }
            let fd = stream.as_raw_fd();
            if self.watch(fd).is_err() {
                inc(&self.stats.host_errors);
                continue;
            }
            self.handshakes.insert(
                fd,
                Handshake {
                    stream,
                    line: Vec::new(),
                },
            );
            self.read_handshake(fd, active);
        }
    }

    /// Reads the `CONNECT <port>\n` line a byte at a time (what follows it is connection data).
    fn read_handshake(&mut self, fd: RawFd, active: bool) {
        let Some(hs) = self.handshakes.get_mut(&fd) else {
            return;
        };
        let mut byte = [0u8; 1];
        loop {
            match host::recv(fd, &mut byte) {
                Ok(1) => {
                    hs.line.push(byte[0]);
                    if byte[0] == b'\n' {
                        break;
                    }
                    if hs.line.len() >= MAX_HANDSHAKE_LINE {
                        inc(&self.stats.host_refused);
                        self.drop_handshake(fd);
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                _ => {
                    inc(&self.stats.host_refused);
                    self.drop_handshake(fd);
                    return;
                }
            }
        }
        let Some(hs) = self.handshakes.remove(&fd) else {
            return;
        };
        let port = match parse_connect(&hs.line) {
            Some(port) if active && self.conns.len() < MAX_CONNECTIONS => port,
            _ => {
                inc(&self.stats.host_refused);
                self.unwatch(fd);
                return;
            }
        };
        let Some(local) = self.free_local_port(port) else {
            inc(&self.stats.host_refused);
            self.unwatch(fd);
            return;
        };
        let key = (local, port);
        let mut conn = Conn::new(hs.stream, key, ConnState::Requesting);
        conn.requested_at = Some(Instant::now());
        let request = conn.header(self.guest_cid, OP_REQUEST);
        self.by_fd.insert(fd, key);
        self.conns.insert(key, conn);
        self.push_control(request);
        self.arm_timer(CONNECT_TIMEOUT);
    }

    fn arm_timer(&mut self, after: Duration) {
        if self.timer_armed {
            return;
        }
        match self.timer.reset(after.max(Duration::from_millis(1)), None) {
            Ok(()) => self.timer_armed = true,
            Err(e) => crate::warn_limited!("vsock: cannot arm the connect timer: {e}"),
        }
    }

    /// The timer fired: resumes a paused listener, and resets the host-initiated requests the
    /// guest left unanswered for [`CONNECT_TIMEOUT`] (their host streams close) and closed
    /// connections whose data the host did not take in that time.
    fn on_timer(&mut self) {
        let _ = self.timer.wait();
        self.timer_armed = false;
        if std::mem::take(&mut self.listener_paused) {
            let readable = EpollEvent::new(EventSet::IN, LISTENER);
            let fd = self.listener.as_raw_fd();
            if let Err(e) = self.epoll.ctl(ControlOperation::Add, fd, readable) {
                crate::warn_limited!("vsock: cannot watch {} again: {e}", self.uds_path);
            }
        }
        let now = Instant::now();
        let mut expired = Vec::new();
        let mut next: Option<Duration> = None;
        for (key, conn) in &self.conns {
            let requested = conn
                .requested_at
                .filter(|_| conn.state == ConnState::Requesting);
            let Some(at) = requested.or(conn.closing_since) else {
                continue;
            };
            let age = now.saturating_duration_since(at);
            match CONNECT_TIMEOUT.checked_sub(age).filter(|d| !d.is_zero()) {
                Some(left) => next = Some(next.map_or(left, |n| n.min(left))),
                None => expired.push(*key),
            }
        }
        for key in expired {
            if self
                .conns
                .get(&key)
                .is_some_and(|c| c.state == ConnState::Requesting)
            {
                inc(&self.stats.host_refused);
            }
            self.reset_conn(key);
        }
        if let Some(left) = next {
            self.arm_timer(left);
        }
    }

    fn free_local_port(&mut self, peer_port: u32) -> Option<u32> {
        for _ in 0..=MAX_CONNECTIONS {
            let port = self.next_local_port;
            self.next_local_port = port.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.contains_key(&(port, peer_port)) {
                return Some(port);
            }
        }
        None
    }

    fn stream_event(&mut self, fd: RawFd, set: EventSet, active: bool) {
        if self.handshakes.contains_key(&fd) {
            self.read_handshake(fd, active);
            return;
        }
        let Some(&key) = self.by_fd.get(&fd) else {
            return;
        };
        let guest_cid = self.guest_cid;
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if set.intersects(EventSet::OUT | EventSet::ERROR | EventSet::HANG_UP) {
            let before = conn.pending_tx();
            if conn.flush().is_err() || (conn.closing_since.is_some() && conn.pending_tx() == 0) {
                self.reset_conn(key);
                return;
            }
            if before > 0 && conn.credit_update_due() {
                self.control
                    .push_back(conn.header(guest_cid, OP_CREDIT_UPDATE));
            }
        }
        let input = EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR;
        if set.intersects(input) {
            conn.readable = true;
            self.queue_rx(key);
        }
    }

    /// The next packet for the guest, for a receive buffer with `room` payload bytes: control
    /// packets first, then host data of the connections in turn. A data packet's payload is in
    /// `rx_buf[..hdr.len]`. `None` when there is nothing to send.
    pub fn next_rx(&mut self, room: usize) -> Option<Header> {
        if let Some(hdr) = self.control.pop_front() {
            return Some(hdr);
        }
        while let Some(key) = self.rx_ready.pop_front() {
            let guest_cid = self.guest_cid;
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            conn.rx_queued = false;
            if !conn.wants_rx() {
                if conn.readable && conn.peer_credit() == 0 {
                    return Some(conn.header(guest_cid, OP_CREDIT_REQUEST));
                }
                continue;
            }
            let want = room.min(usize::try_from(conn.peer_credit()).unwrap_or(usize::MAX));
            match host::recv(conn.fd(), &mut self.rx_buf[..want]) {
                Ok(0) => {
                    conn.host_eof = true;
                    if conn.peer_no_send && conn.pending_tx() == 0 {
                        self.reset_conn(key);
                        return self.control.pop_back();
                    }
                    let mut hdr = conn.header(guest_cid, OP_SHUTDOWN);
                    hdr.flags = SHUTDOWN_SEND;
                    return Some(hdr);
                }
                Ok(n) => {
                    let len = u32::try_from(n).unwrap_or(0);
                    conn.rx_cnt = conn.rx_cnt.wrapping_add(len);
                    let mut hdr = conn.header(guest_cid, OP_RW);
                    hdr.len = len;
                    add(&self.stats.bytes_to_guest, n);
                    self.queue_rx(key);
                    return Some(hdr);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => conn.readable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => self.queue_rx(key),
                Err(_) => {
                    self.reset_conn(key);
                    return self.control.pop_back();
                }
            }
        }
        None
    }

    /// Puts back a packet [`Mux::next_rx`] gave that could not be delivered (control packets
    /// only; data was already read from the host stream and is resent as is).
    pub fn requeue_front(&mut self, hdr: Header) {
        self.control.push_front(hdr);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines_parse_only_in_their_exact_form() {
        assert_eq!(parse_connect(b"CONNECT 52\n"), Some(52));
        assert_eq!(parse_connect(b"CONNECT 4294967295\r\n"), Some(u32::MAX));
        assert_eq!(parse_connect(b"CONNECT 4294967296\n"), None);
        assert_eq!(parse_connect(b"connect 52\n"), None);
        assert_eq!(parse_connect(b"CONNECT\n"), None);
        assert_eq!(parse_connect(b"CONNECT -1\n"), None);
        assert_eq!(parse_connect(&[0xff, b'\n']), None);
    }
}
