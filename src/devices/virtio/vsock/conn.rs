//! One vsock stream connection between a guest port and a host unix stream, with both
//! directions' credit accounting (virtio spec 5.10.6.3):
//! - guest → host: the device advertises `buf_alloc` = [`TX_BUF_SIZE`] and `fwd_cnt` = bytes
//!   written to the host stream; guest data waits in a buffer bounded by that size while the
//!   host stream is full, and a guest that sends past its credit is reset.
//! - host → guest: the guest advertises its own `buf_alloc`/`fwd_cnt`; the device reads from the
//!   host stream only as much as the guest has room for.
//!
//! Counters are 32-bit and wrap, as the spec's are.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use super::host;
use super::packet::{Header, HOST_CID, TYPE_STREAM};

/// Bytes of guest data a connection buffers for a slow host stream (its `buf_alloc`).
pub const TX_BUF_SIZE: u32 = 256 * 1024;
/// Forwarded bytes after which the guest is told about the room they freed.
pub const CREDIT_UPDATE_THRESHOLD: u32 = 64 * 1024;

/// Where a connection is in its handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// Host-initiated: a REQUEST went to the guest, no answer yet.
    Requesting,
    Established,
}

/// The guest sent more than the credit it was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("guest sent {len} bytes with {room} bytes of credit")]
pub struct CreditOverrun {
    pub len: usize,
    pub room: usize,
}

/// A connection's guest-visible identity: (host port, guest port).
pub type Key = (u32, u32);

#[derive(Debug)]
pub struct Conn {
    pub stream: OwnedFd,
    pub local_port: u32,
    pub peer_port: u32,
    pub state: ConnState,
    /// The guest's receive buffer size and the bytes it has consumed of what we sent.
    pub peer_buf_alloc: u32,
    pub peer_fwd_cnt: u32,
    /// Bytes sent to the guest.
    pub rx_cnt: u32,
    /// The host stream may have data (edge-triggered: set by an event, cleared by EAGAIN).
    pub readable: bool,
    /// The host stream ended; the guest was told.
    pub host_eof: bool,
    /// The guest will receive no more.
    pub peer_no_rcv: bool,
    /// Guest data not yet written to the host stream.
    tx_buf: VecDeque<u8>,
    /// Guest bytes written to the host stream.
    pub fwd_cnt: u32,
    /// `fwd_cnt` as last told to the guest.
    fwd_cnt_sent: u32,
    /// The guest will send no more: end the host stream once `tx_buf` is written.
    pub peer_no_send: bool,
    /// Queued for the receive path.
    pub rx_queued: bool,
    /// When the REQUEST of a host-initiated connection was queued.
    pub requested_at: Option<std::time::Instant>,
    /// When the guest closed while data still waited for the host stream.
    pub closing_since: Option<std::time::Instant>,
}

impl Conn {
    pub fn new(stream: OwnedFd, key: Key, state: ConnState) -> Conn {
        Conn {
            stream,
            local_port: key.0,
            peer_port: key.1,
            state,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            rx_cnt: 0,
            readable: true,
            host_eof: false,
            peer_no_rcv: false,
            tx_buf: VecDeque::new(),
            fwd_cnt: 0,
            fwd_cnt_sent: 0,
            peer_no_send: false,
            rx_queued: false,
            requested_at: None,
            closing_since: None,
        }
    }

    pub fn fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    /// Takes the guest's credit fields from one of its packets.
    pub fn update_peer_credit(&mut self, hdr: &Header) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = hdr.fwd_cnt;
    }

    /// Bytes the guest has room for; 0 when its counters claim more in flight than it has room.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = self.rx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Whether host data could go to the guest now (given a receive buffer).
    pub fn wants_rx(&self) -> bool {
        self.state == ConnState::Established
            && self.readable
            && !self.host_eof
            && !self.peer_no_rcv
            && self.peer_credit() > 0
    }

    /// A header from this connection to the guest, carrying our credit.
    pub fn header(&mut self, guest_cid: u64, op: u16) -> Header {
        self.fwd_cnt_sent = self.fwd_cnt;
        Header {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len: 0,
            kind: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: TX_BUF_SIZE,
            fwd_cnt: self.fwd_cnt,
        }
    }

    /// Whether the guest should hear about the room freed since our last header.
    pub fn credit_update_due(&self) -> bool {
        self.fwd_cnt.wrapping_sub(self.fwd_cnt_sent) >= CREDIT_UPDATE_THRESHOLD
    }

    /// Guest data still waiting for the host stream.
    pub fn pending_tx(&self) -> usize {
        self.tx_buf.len()
    }

    /// Accepts guest data within its credit, then writes what the host stream takes.
    pub fn push_guest_data(&mut self, data: &[u8]) -> Result<io::Result<()>, CreditOverrun> {
        let room = (TX_BUF_SIZE as usize).saturating_sub(self.tx_buf.len());
        if data.len() > room {
            return Err(CreditOverrun {
                len: data.len(),
                room,
            });
        }
        self.tx_buf.extend(data);
        Ok(self.flush())
    }

    /// Writes buffered guest data to the host stream until it is empty or the stream is full;
    /// ends the host stream's direction once the guest said it sends no more.
    pub fn flush(&mut self) -> io::Result<()> {
        while !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            match host::send(self.fd(), front) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(u32::try_from(n).unwrap_or(0));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.peer_no_send {
            host::shutdown_write(self.fd());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;
    use std::os::unix::net::UnixStream;

    fn pair() -> (Conn, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        // SAFETY: the raw fd comes from a stream we give up here.
        let fd = unsafe { OwnedFd::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(a)) };
        (Conn::new(fd, (52, 1000), ConnState::Established), b)
    }

    fn peer(buf_alloc: u32, fwd_cnt: u32) -> Header {
        Header {
            buf_alloc,
            fwd_cnt,
            ..Header::default()
        }
    }

    #[test]
    fn peer_credit_follows_the_guests_counters_and_wraps() {
        let (mut c, _b) = pair();
        c.update_peer_credit(&peer(4096, 0));
        c.rx_cnt = 1000;
        assert_eq!(c.peer_credit(), 3096);
        c.rx_cnt = 5;
        c.update_peer_credit(&peer(4096, u32::MAX - 10));
        assert_eq!(c.peer_credit(), 4096 - 16);
    }

    #[test]
    fn hostile_peer_counters_give_no_credit_instead_of_wrapping() {
        let (mut c, _b) = pair();
        c.rx_cnt = 10_000;
        c.update_peer_credit(&peer(4096, 0));
        assert_eq!(c.peer_credit(), 0);
        assert!(!c.wants_rx());
        c.update_peer_credit(&peer(0, 10_000));
        assert_eq!(c.peer_credit(), 0);
    }

    #[test]
    fn guest_data_past_its_credit_is_refused_and_not_buffered() {
        let (mut c, b) = pair();
        // Nobody reads `b`: the socket fills, the rest stays buffered up to TX_BUF_SIZE.
        let chunk = vec![7u8; 64 * 1024];
        let mut sent = 0usize;
        loop {
            match c.push_guest_data(&chunk) {
                Ok(r) => {
                    r.unwrap();
                    sent += chunk.len();
                }
                Err(e) => {
                    assert!(e.room < chunk.len(), "{e}");
                    break;
                }
            }
            assert!(sent < 64 << 20, "credit never ran out");
        }
        assert!(c.pending_tx() <= TX_BUF_SIZE as usize);
        assert_eq!(
            c.fwd_cnt as usize + c.pending_tx(),
            sent,
            "every accepted byte is either forwarded or buffered"
        );
        drop(b);
    }

    #[test]
    fn forwarded_bytes_make_a_credit_update_due_and_a_header_clears_it() {
        let (mut c, mut b) = pair();
        c.push_guest_data(&vec![1u8; CREDIT_UPDATE_THRESHOLD as usize])
            .unwrap()
            .unwrap();
        assert!(c.credit_update_due());
        let h = c.header(3, super::super::packet::OP_CREDIT_UPDATE);
        assert_eq!(
            (h.fwd_cnt, h.buf_alloc),
            (CREDIT_UPDATE_THRESHOLD, TX_BUF_SIZE)
        );
        assert!(!c.credit_update_due());
        let mut got = vec![0u8; CREDIT_UPDATE_THRESHOLD as usize];
        std::io::Read::read_exact(&mut b, &mut got).unwrap();
    }

    #[test]
    fn a_closed_host_stream_is_an_error_not_a_signal() {
        let (mut c, b) = pair();
        drop(b);
        assert!(c.push_guest_data(b"x").unwrap().is_err());
    }
}
