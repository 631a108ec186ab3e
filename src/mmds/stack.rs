//! The MMDS responder of one network interface: it takes the guest's Ethernet frames addressed
//! to the MMDS address (ARP requests for it, IPv4 to it), answers ARP itself, hands IPv4 to a
//! smoltcp interface with TCP sockets listening on port 80, serves HTTP on them from the shared
//! store, and queues the Ethernet frames to deliver back to the guest.
//!
//! Everything is bounded: at most [`MAX_CONNECTIONS`] sockets (further SYNs are reset), requests
//! up to [`super::http::MAX_REQUEST_BYTES`], at most [`MAX_QUEUED_FRAMES`] frames waiting for the
//! guest (later ones are dropped; TCP retransmits). Idle connections time out. Runs on the VMM
//! thread, inside the network device.

use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, Checksum, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr};

use super::http::{self, Parsed};
use super::SharedMmds;

/// The MAC address MMDS answers ARP with and sends from.
pub const MMDS_MAC: [u8; 6] = [0x06, 0x01, 0x23, 0x45, 0x67, 0x01];
/// Most TCP connections open at once, per interface.
pub const MAX_CONNECTIONS: usize = 16;
/// Most frames waiting for the guest.
pub const MAX_QUEUED_FRAMES: usize = 256;
const HTTP_PORT: u16 = 80;
const MTU: usize = 1500;
const SOCKET_RX_BYTES: usize = http::MAX_REQUEST_BYTES;
const SOCKET_TX_BYTES: usize = 16 * 1024;
/// A connection that hears nothing from the guest for this long is reset.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest answer kept for one connection (the document limit bounds it unless set higher);
/// a larger one is answered with 413.
const MAX_RESPONSE_BYTES: usize = 4 << 20;

const ETH_HEADER: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_ARP: u16 = 0x0806;
const ARP_LEN: usize = 28;
const IP_PROTO_TCP: u8 = 6;

/// Counters of one responder.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StackStats {
    /// Frames taken from the guest (ARP and IPv4 for MMDS).
    pub frames_in: u64,
    /// Frames queued for the guest.
    pub frames_out: u64,
    /// Frames for the guest dropped because too many were waiting.
    pub frames_dropped: u64,
    /// IPv4 packets for MMDS that were not TCP, or malformed.
    pub unusual: u64,
    /// Connections reset for sending too much or misbehaving.
    pub connections_reset: u64,
}

/// The smoltcp side: IP packets in from the guest, IP packets out to it.
#[derive(Debug, Default)]
struct Packets {
    rx: VecDeque<Vec<u8>>,
    tx: VecDeque<Vec<u8>>,
}

struct RxToken(Vec<u8>);
struct TxToken<'a>(&'a mut VecDeque<Vec<u8>>);

impl phy::RxToken for RxToken {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut packet = vec![0u8; len];
        let result = f(&mut packet);
        self.0.push_back(packet);
        result
    }
}

impl phy::Device for Packets {
    type RxToken<'a> = RxToken;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _: smoltcp::time::Instant) -> Option<(RxToken, TxToken<'_>)> {
        let packet = self.rx.pop_front()?;
        Some((RxToken(packet), TxToken(&mut self.tx)))
    }

    fn transmit(&mut self, _: smoltcp::time::Instant) -> Option<TxToken<'_>> {
        (self.tx.len() < MAX_QUEUED_FRAMES).then_some(TxToken(&mut self.tx))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = MTU;
        // The guest may leave TCP checksums to the device (checksum offload): do not check
        // them on the way in, compute them on the way out.
        caps.checksum.tcp = Checksum::Tx;
        caps
    }
}

/// One open connection's HTTP state.
#[derive(Debug, Default)]
struct Connection {
    request: Vec<u8>,
    response: Vec<u8>,
    /// Close once `response` is sent.
    closing: bool,
}

/// The responder of one interface.
pub struct MmdsStack {
    ip: Ipv4Addr,
    store: SharedMmds,
    /// Where frames to the guest go: the source of its last MMDS frame.
    guest_mac: [u8; 6],
    iface: Interface,
    packets: Packets,
    sockets: SocketSet<'static>,
    connections: Vec<(SocketHandle, Connection)>,
    /// Ethernet frames for the guest.
    out: VecDeque<Vec<u8>>,
    epoch: Instant,
    pub stats: StackStats,
}

impl std::fmt::Debug for MmdsStack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmdsStack")
            .field("ip", &self.ip)
            .field("connections", &self.connections.len())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

fn random_seed() -> u64 {
    let mut seed = [0u8; 8];
    // SAFETY: getrandom writes at most 8 bytes into `seed`, which we own.
    let n = unsafe { libc::getrandom(seed.as_mut_ptr().cast(), seed.len(), 0) };
    if n != 8 {
        // Only initial sequence numbers depend on it; the clock is good enough then.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        return u64::from(nanos) | 1;
    }
    u64::from_le_bytes(seed)
}

fn ethertype(frame: &[u8]) -> Option<u16> {
    (frame.len() >= ETH_HEADER).then(|| u16::from_be_bytes([frame[12], frame[13]]))
}

impl MmdsStack {
    /// A responder at `ip` answering from `store`.
    pub fn new(ip: Ipv4Addr, store: SharedMmds) -> Self {
        let epoch = Instant::now();
        let mut packets = Packets::default();
        let mut config = Config::new(HardwareAddress::Ip);
        config.random_seed = random_seed();
        let mut iface = Interface::new(config, &mut packets, smoltcp::time::Instant::ZERO);
        iface.update_ip_addrs(|addrs| {
            let _ = addrs.push(IpCidr::new(IpAddress::Ipv4(ip), 32));
        });
        // Replies go back over the one link whatever the guest's address: route everything.
        let _ = iface.routes_mut().add_default_ipv4_route(ip);
        let mut stack = MmdsStack {
            ip,
            store,
            guest_mac: [0xff; 6],
            iface,
            packets,
            sockets: SocketSet::new(Vec::new()),
            connections: Vec::new(),
            out: VecDeque::new(),
            epoch,
            stats: StackStats::default(),
        };
        stack.keep_listening();
        stack
    }

    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    fn now(&self) -> smoltcp::time::Instant {
        let micros = i64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(i64::MAX);
        smoltcp::time::Instant::from_micros(micros)
    }

    /// Whether `frame` (Ethernet, no virtio header) is for MMDS; if so it is taken (answered or
    /// dropped) and must not go to the host. Other frames are left alone.
    pub fn detour(&mut self, frame: &[u8]) -> bool {
        match ethertype(frame) {
            Some(ETHERTYPE_ARP) => self.detour_arp(frame),
            Some(ETHERTYPE_IPV4) => self.detour_ipv4(frame),
            _ => false,
        }
    }

    fn detour_arp(&mut self, frame: &[u8]) -> bool {
        let Some(arp) = frame.get(ETH_HEADER..ETH_HEADER + ARP_LEN) else {
            return false;
        };
        // Ethernet/IPv4 request (htype 1, ptype 0x0800, hlen 6, plen 4, oper 1) for our address.
        let is_request = arp[..8] == [0, 1, 8, 0, 6, 4, 0, 1];
        if !is_request || arp[24..28] != self.ip.octets() {
            return false;
        }
        self.stats.frames_in += 1;
        let mut sender_mac = [0u8; 6];
        sender_mac.copy_from_slice(&arp[8..14]);
        let sender_ip = &arp[14..18];
        let mut reply = Vec::with_capacity(ETH_HEADER + ARP_LEN);
        reply.extend_from_slice(&sender_mac);
        reply.extend_from_slice(&MMDS_MAC);
        reply.extend_from_slice(&ETHERTYPE_ARP.to_be_bytes());
        reply.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 2]);
        reply.extend_from_slice(&MMDS_MAC);
        reply.extend_from_slice(&self.ip.octets());
        reply.extend_from_slice(&sender_mac);
        reply.extend_from_slice(sender_ip);
        self.push_out(reply);
        true
    }

    fn detour_ipv4(&mut self, frame: &[u8]) -> bool {
        let ip = &frame[ETH_HEADER..];
        if ip.len() < 20 || ip[0] >> 4 != 4 || ip[16..20] != self.ip.octets() {
            return false;
        }
        // From here on the frame is ours: it is answered or dropped, never forwarded.
        self.stats.frames_in += 1;
        let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
        if ip[9] != IP_PROTO_TCP || total < 20 || total > ip.len() {
            self.stats.unusual += 1;
            return true;
        }
        self.guest_mac.copy_from_slice(&frame[6..12]);
        self.packets.rx.push_back(ip[..total].to_vec());
        self.poll();
        true
    }

    /// The next Ethernet frame for the guest.
    pub fn pop_frame(&mut self) -> Option<Vec<u8>> {
        self.out.pop_front()
    }

    /// Whether frames wait for the guest.
    pub fn has_frames(&self) -> bool {
        !self.out.is_empty()
    }

    /// How long until [`MmdsStack::poll`] must run again (retransmissions, time-outs); `None`
    /// when nothing is pending.
    pub fn poll_delay(&mut self) -> Option<Duration> {
        let now = self.now();
        self.iface
            .poll_delay(now, &self.sockets)
            .map(|d| Duration::from_micros(d.total_micros()))
    }

    /// Runs the TCP/IP stack and the HTTP connections until neither has more to do.
    pub fn poll(&mut self) {
        // Each round either moves bytes or stops; the bound only guards against a stack bug.
        for _ in 0..64 {
            let now = self.now();
            self.iface.poll(now, &mut self.packets, &mut self.sockets);
            let progressed = self.serve_connections();
            self.keep_listening();
            self.wrap_outgoing();
            if !progressed && self.packets.rx.is_empty() {
                break;
            }
        }
    }

    fn push_out(&mut self, frame: Vec<u8>) {
        if self.out.len() >= MAX_QUEUED_FRAMES {
            self.stats.frames_dropped += 1;
            crate::warn_limited!("MMDS: the guest is not taking its frames; dropping one");
            return;
        }
        self.stats.frames_out += 1;
        self.out.push_back(frame);
    }

    fn wrap_outgoing(&mut self) {
        while let Some(packet) = self.packets.tx.pop_front() {
            let mut frame = Vec::with_capacity(ETH_HEADER + packet.len());
            frame.extend_from_slice(&self.guest_mac);
            frame.extend_from_slice(&MMDS_MAC);
            frame.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
            frame.extend_from_slice(&packet);
            self.push_out(frame);
        }
    }

    /// Keeps one socket listening while there is room for another connection.
    fn keep_listening(&mut self) {
        let listening = self
            .connections
            .iter()
            .any(|(h, _)| self.sockets.get::<tcp::Socket>(*h).state() == tcp::State::Listen);
        if listening || self.connections.len() >= MAX_CONNECTIONS {
            return;
        }
        let rx = tcp::SocketBuffer::new(vec![0; SOCKET_RX_BYTES]);
        let tx = tcp::SocketBuffer::new(vec![0; SOCKET_TX_BYTES]);
        let mut socket = tcp::Socket::new(rx, tx);
        socket.set_timeout(Some(smoltcp::time::Duration::from_secs(
            IDLE_TIMEOUT.as_secs(),
        )));
        socket.set_ack_delay(None);
        socket.set_nagle_enabled(false);
        if socket.listen(HTTP_PORT).is_err() {
            return;
        }
        let handle = self.sockets.add(socket);
        self.connections.push((handle, Connection::default()));
    }

    /// Reads requests, answers them, sends answers; drops finished sockets. Whether anything
    /// moved.
    fn serve_connections(&mut self) -> bool {
        let mut progressed = false;
        let mut finished = Vec::new();
        for (handle, conn) in &mut self.connections {
            let socket = self.sockets.get_mut::<tcp::Socket>(*handle);
            match socket.state() {
                tcp::State::Listen => continue,
                tcp::State::Closed | tcp::State::TimeWait => {
                    finished.push(*handle);
                    continue;
                }
                _ => {}
            }
            progressed |= read_request(socket, conn, &mut self.stats);
            progressed |= answer(&self.store, conn);
            progressed |= send_response(socket, conn);
            // Close once the answer is out and no more requests will be read: after an answer
            // that closes, or when the guest has closed its side.
            let peer_done = socket.state() == tcp::State::CloseWait;
            let open = matches!(
                socket.state(),
                tcp::State::Established | tcp::State::CloseWait
            );
            if open && conn.response.is_empty() && (conn.closing || peer_done) {
                socket.close();
            }
        }
        for handle in finished {
            self.sockets.remove(handle);
            self.connections.retain(|(h, _)| *h != handle);
        }
        progressed
    }
}

/// Moves received bytes into the connection's request buffer; resets a connection that sends
/// more than a request may hold.
fn read_request(
    socket: &mut tcp::Socket<'_>,
    conn: &mut Connection,
    stats: &mut StackStats,
) -> bool {
    if !socket.can_recv() || conn.closing {
        return false;
    }
    let room = http::MAX_REQUEST_BYTES.saturating_sub(conn.request.len());
    if room == 0 {
        stats.connections_reset += 1;
        socket.abort();
        return true;
    }
    let mut chunk = vec![0u8; room];
    match socket.recv_slice(&mut chunk) {
        Ok(n) if n > 0 => {
            conn.request.extend_from_slice(&chunk[..n]);
            true
        }
        Ok(_) => false,
        Err(_) => {
            socket.abort();
            true
        }
    }
}

/// Answers the complete requests at the head of the buffer (one at a time, while the previous
/// answer is being sent nothing new is parsed).
fn answer(store: &SharedMmds, conn: &mut Connection) -> bool {
    if conn.closing || !conn.response.is_empty() || conn.request.is_empty() {
        return false;
    }
    let parsed = http::serve(&mut super::lock(store), &conn.request);
    match parsed {
        Parsed::Incomplete => false,
        Parsed::Answered {
            consumed,
            response,
            close,
        } => {
            conn.request.drain(..consumed.min(conn.request.len()));
            if response.len() > MAX_RESPONSE_BYTES {
                conn.response = http::too_large();
                conn.closing = true;
            } else {
                conn.response = response;
                conn.closing = close;
            }
            true
        }
    }
}

fn send_response(socket: &mut tcp::Socket<'_>, conn: &mut Connection) -> bool {
    if conn.response.is_empty() || !socket.can_send() {
        return false;
    }
    match socket.send_slice(&conn.response) {
        Ok(n) if n > 0 => {
            conn.response.drain(..n);
            true
        }
        Ok(_) => false,
        Err(_) => {
            conn.response.clear();
            socket.abort();
            true
        }
    }
}

#[cfg(test)]
pub mod tests {
    //! A fake guest: a smoltcp client whose IP packets are wrapped in Ethernet frames.
    use super::*;
    use crate::config::MmdsVersion;
    use crate::mmds::{self, Mmds};

    pub const GUEST_MAC: [u8; 6] = [0x06, 0, 0xac, 0x10, 0, 2];
    pub const GUEST_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 0, 2);
    pub const MMDS_IP: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

    pub fn eth(dst: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut frame = Vec::new();
        frame.extend_from_slice(&dst);
        frame.extend_from_slice(&GUEST_MAC);
        frame.extend_from_slice(&ethertype.to_be_bytes());
        frame.extend_from_slice(payload);
        frame
    }

    pub fn arp_request(target: Ipv4Addr) -> Vec<u8> {
        let mut arp = vec![0, 1, 8, 0, 6, 4, 0, 1];
        arp.extend_from_slice(&GUEST_MAC);
        arp.extend_from_slice(&GUEST_IP.octets());
        arp.extend_from_slice(&[0; 6]);
        arp.extend_from_slice(&target.octets());
        eth([0xff; 6], ETHERTYPE_ARP, &arp)
    }

    pub fn store(version: MmdsVersion) -> SharedMmds {
        let mut mmds = Mmds::default();
        mmds.put(serde_json::json!({"latest": {"meta-data": {"ami-id": "ami-1"}}}))
            .unwrap();
        mmds.configure(version, false);
        mmds::shared(mmds)
    }

    /// A TCP client on the guest's side.
    #[allow(missing_debug_implementations)]
    pub struct Client {
        iface: Interface,
        packets: Packets,
        sockets: SocketSet<'static>,
        pub handle: SocketHandle,
        now: i64,
    }

    impl Client {
        pub fn connect(port: u16) -> Client {
            let mut packets = Packets::default();
            let mut config = Config::new(HardwareAddress::Ip);
            config.random_seed = 7;
            let mut iface = Interface::new(config, &mut packets, smoltcp::time::Instant::ZERO);
            iface.update_ip_addrs(|a| {
                let _ = a.push(IpCidr::new(IpAddress::Ipv4(GUEST_IP), 16));
            });
            let mut sockets = SocketSet::new(Vec::new());
            let rx = tcp::SocketBuffer::new(vec![0; 65536]);
            let tx = tcp::SocketBuffer::new(vec![0; 8192]);
            let handle = sockets.add(tcp::Socket::new(rx, tx));
            let socket = sockets.get_mut::<tcp::Socket>(handle);
            static NEXT_PORT: std::sync::atomic::AtomicU16 =
                std::sync::atomic::AtomicU16::new(40000);
            let local = NEXT_PORT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            socket
                .connect(iface.context(), (MMDS_IP, port), local)
                .unwrap();
            Client {
                iface,
                packets,
                sockets,
                handle,
                now: 0,
            }
        }

        pub fn socket(&mut self) -> &mut tcp::Socket<'static> {
            self.sockets.get_mut::<tcp::Socket>(self.handle)
        }

        /// Frames the client wants to send, as Ethernet frames to MMDS.
        pub fn frames(&mut self) -> Vec<Vec<u8>> {
            self.now += 1000;
            let now = smoltcp::time::Instant::from_micros(self.now);
            self.iface.poll(now, &mut self.packets, &mut self.sockets);
            self.packets
                .tx
                .drain(..)
                .map(|p| eth(MMDS_MAC, ETHERTYPE_IPV4, &p))
                .collect()
        }

        /// Takes an Ethernet frame from MMDS, checking its IPv4 and TCP checksums (the guest
        /// relies on them: no checksum offload is claimed on the way in).
        pub fn deliver(&mut self, frame: &[u8]) {
            use smoltcp::wire::{Ipv4Packet, TcpPacket};
            assert_eq!(&frame[..6], &GUEST_MAC, "frames go to the guest's MAC");
            assert_eq!(&frame[6..12], &MMDS_MAC);
            let ip = Ipv4Packet::new_checked(&frame[ETH_HEADER..]).unwrap();
            assert!(ip.verify_checksum(), "IPv4 checksum");
            let tcp = TcpPacket::new_checked(ip.payload()).unwrap();
            let (src, dst) = (
                IpAddress::Ipv4(ip.src_addr()),
                IpAddress::Ipv4(ip.dst_addr()),
            );
            assert!(tcp.verify_checksum(&src, &dst), "TCP checksum");
            self.packets.rx.push_back(frame[ETH_HEADER..].to_vec());
        }

        pub fn received(&mut self) -> String {
            let mut out = vec![0u8; 65536];
            let n = self.socket().recv_slice(&mut out).unwrap_or(0);
            String::from_utf8_lossy(&out[..n]).into_owned()
        }
    }

    /// Exchanges frames between `client` and `stack` until both are quiet.
    pub fn exchange(client: &mut Client, stack: &mut MmdsStack) {
        for _ in 0..50 {
            let frames = client.frames();
            let mut moved = !frames.is_empty();
            for f in frames {
                assert!(stack.detour(&f));
            }
            while let Some(f) = stack.pop_frame() {
                client.deliver(&f);
                moved = true;
            }
            if !moved {
                return;
            }
        }
    }

    /// Sends `request` on a fresh connection and returns everything received.
    pub fn fetch(stack: &mut MmdsStack, request: &str) -> String {
        let mut client = Client::connect(80);
        exchange(&mut client, stack);
        assert_eq!(client.socket().state(), tcp::State::Established);
        client.socket().send_slice(request.as_bytes()).unwrap();
        exchange(&mut client, stack);
        client.received()
    }

    #[test]
    fn arp_requests_for_mmds_are_answered_and_others_left_alone() {
        let mut stack = MmdsStack::new(MMDS_IP, store(MmdsVersion::V1));
        assert!(!stack.detour(&arp_request(Ipv4Addr::new(169, 254, 0, 1))));
        assert!(stack.detour(&arp_request(MMDS_IP)));
        let reply = stack.pop_frame().unwrap();
        assert_eq!(&reply[..6], &GUEST_MAC);
        assert_eq!(&reply[12..14], &[8, 6]);
        assert_eq!(&reply[20..22], &[0, 2], "an ARP reply");
        assert_eq!(&reply[22..28], &MMDS_MAC, "sender hardware address");
        assert_eq!(&reply[28..32], &MMDS_IP.octets(), "sender protocol address");
        assert_eq!(
            &reply[38..42],
            &GUEST_IP.octets(),
            "target protocol address"
        );
        assert!(stack.pop_frame().is_none());
    }

    #[test]
    fn frames_not_for_mmds_are_not_taken() {
        let mut stack = MmdsStack::new(MMDS_IP, store(MmdsVersion::V1));
        let mut ip = vec![0x45, 0, 0, 20, 0, 0, 0, 0, 64, 6, 0, 0];
        ip.extend_from_slice(&GUEST_IP.octets());
        ip.extend_from_slice(&[10, 0, 0, 1]);
        assert!(!stack.detour(&eth([1; 6], ETHERTYPE_IPV4, &ip)));
        assert!(!stack.detour(&eth([1; 6], 0x86dd, &[0; 40])));
        assert!(!stack.detour(&[0u8; 10]));
        assert!(!stack.detour(&eth([1; 6], ETHERTYPE_IPV4, &[0x45, 0])));
    }

    #[test]
    fn malformed_ipv4_for_mmds_is_dropped() {
        let mut stack = MmdsStack::new(MMDS_IP, store(MmdsVersion::V1));
        let mut ip = vec![0x45, 0, 0xff, 0xff, 0, 0, 0, 0, 64, 6, 0, 0];
        ip.extend_from_slice(&GUEST_IP.octets());
        ip.extend_from_slice(&MMDS_IP.octets());
        assert!(stack.detour(&eth(MMDS_MAC, ETHERTYPE_IPV4, &ip)));
        ip[9] = 1; // ICMP
        assert!(stack.detour(&eth(MMDS_MAC, ETHERTYPE_IPV4, &ip)));
        assert_eq!(stack.stats.unusual, 2);
        assert!(stack.pop_frame().is_none());
    }

    #[test]
    fn a_tcp_get_is_answered_with_the_value() {
        let mut stack = MmdsStack::new(MMDS_IP, store(MmdsVersion::V1));
        let text = fetch(
            &mut stack,
            "GET /latest/meta-data/ami-id HTTP/1.1\r\nConnection: close\r\n\r\n",
        );
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\nami-1"), "{text}");
    }

    #[test]
    fn v2_token_flow_over_tcp() {
        let mut stack = MmdsStack::new(MMDS_IP, store(MmdsVersion::V2));
        let denied = fetch(&mut stack, "GET /latest HTTP/1.1\r\n\r\n");
        assert!(denied.starts_with("HTTP/1.1 401 "), "{denied}");
        let put = "PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 30\r\n\r\n";
        let answer = fetch(&mut stack, put);
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
        let token = answer.split("\r\n\r\n").nth(1).unwrap();
        let get =
            format!("GET /latest/meta-data/ami-id HTTP/1.1\r\nX-metadata-token: {token}\r\n\r\n");
        let text = fetch(&mut stack, &get);
        assert!(text.ends_with("\r\n\r\nami-1"), "{text}");
    }

    #[test]
    fn keep_alive_connections_answer_several_requests() {
        let mut stack = MmdsStack::new(MMDS_IP, store(MmdsVersion::V1));
        let one = "GET /latest HTTP/1.1\r\n\r\n";
        let text = fetch(&mut stack, &format!("{one}{one}"));
        assert_eq!(text.matches("HTTP/1.1 200 OK").count(), 2, "{text}");
    }

    #[test]
    fn an_answer_larger_than_a_connection_may_hold_gets_413() {
        let mut mmds = Mmds::new(8 << 20);
        mmds.put(serde_json::json!({"big": "x".repeat(MAX_RESPONSE_BYTES)}))
            .unwrap();
        let mut stack = MmdsStack::new(MMDS_IP, mmds::shared(mmds));
        let text = fetch(&mut stack, "GET /big HTTP/1.1\r\n\r\n");
        assert!(
            text.starts_with("HTTP/1.1 413 "),
            "{}",
            &text[..text.len().min(100)]
        );
    }

    #[test]
    fn other_ports_are_reset() {
        let mut stack = MmdsStack::new(MMDS_IP, store(MmdsVersion::V1));
        let mut client = Client::connect(22);
        exchange(&mut client, &mut stack);
        assert_eq!(client.socket().state(), tcp::State::Closed);
    }

    #[test]
    fn oversized_requests_reset_the_connection() {
        let mut stack = MmdsStack::new(MMDS_IP, store(MmdsVersion::V1));
        let mut client = Client::connect(80);
        exchange(&mut client, &mut stack);
        let junk = vec![b'a'; 8000];
        let mut sent = 0;
        for _ in 0..20 {
            sent += client.socket().send_slice(&junk[sent..]).unwrap_or(0);
            exchange(&mut client, &mut stack);
            if client.socket().state() == tcp::State::Closed {
                break;
            }
        }
        let text = client.received();
        assert!(
            client.socket().state() == tcp::State::Closed || text.starts_with("HTTP/1.1 400"),
            "{:?} {text}",
            client.socket().state()
        );
    }

    #[test]
    fn random_frames_for_mmds_never_panic_and_stay_bounded() {
        let mut stack = MmdsStack::new(MMDS_IP, store(MmdsVersion::V2));
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for round in 0..5000u32 {
            let len = usize::try_from(next() % 200).unwrap();
            let mut payload: Vec<u8> = (0..len).map(|_| next().to_le_bytes()[0]).collect();
            // Most rounds: an IPv4 header to MMDS (TCP) with random fields after it.
            if round % 4 != 0 && payload.len() >= 40 {
                payload[0] = 0x45;
                payload[9] = IP_PROTO_TCP;
                payload[16..20].copy_from_slice(&MMDS_IP.octets());
                let total = u16::try_from(payload.len()).unwrap();
                payload[2..4].copy_from_slice(&total.to_be_bytes());
            }
            let ethertype = if round % 7 == 0 {
                ETHERTYPE_ARP
            } else {
                ETHERTYPE_IPV4
            };
            stack.detour(&eth(MMDS_MAC, ethertype, &payload));
            if round % 3 == 0 {
                while stack.pop_frame().is_some() {}
            }
        }
        assert!(stack.connections.len() <= MAX_CONNECTIONS);
        assert!(stack.out.len() <= MAX_QUEUED_FRAMES);
    }

    #[test]
    fn a_syn_flood_is_bounded() {
        let mut stack = MmdsStack::new(MMDS_IP, store(MmdsVersion::V1));
        let mut clients: Vec<Client> = (0..MAX_CONNECTIONS + 8)
            .map(|i| {
                let mut c = Client::connect(80);
                c.socket().abort();
                let port = 41000 + u16::try_from(i).unwrap();
                let cx = c.iface.context();
                let socket = c.sockets.get_mut::<tcp::Socket>(c.handle);
                socket.connect(cx, (MMDS_IP, 80), port).unwrap();
                c
            })
            .collect();
        for c in &mut clients {
            for f in c.frames() {
                assert!(stack.detour(&f));
            }
        }
        assert!(stack.connections.len() <= MAX_CONNECTIONS);
        assert!(stack.out.len() <= MAX_QUEUED_FRAMES);
    }
}
