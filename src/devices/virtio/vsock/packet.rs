//! vsock packets (virtio spec 5.10.6): the 44-byte little-endian header and the checked moves of
//! packets between guest memory and the host, over the descriptors of one chain. Pure: guest
//! memory through vm-memory's checked accessors only, no host I/O.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress};

/// Size of the packet header.
pub const HDR_LEN: usize = 44;
/// The host's context id.
pub const HOST_CID: u64 = 2;
/// Stream sockets, the only type supported.
pub const TYPE_STREAM: u16 = 1;
/// Largest payload of one packet, either way (the Linux driver's limit too).
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// Most descriptors accepted in one chain.
pub const MAX_DESCS: usize = 64;

/// Packet operations.
pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;

/// SHUTDOWN flags: the sender will receive no more data, will send no more data.
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;

/// A packet header.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub kind: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

fn u16_at(b: &[u8; HDR_LEN], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8; HDR_LEN], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8; HDR_LEN], at: usize) -> u64 {
    u64::from(u32_at(b, at)) | (u64::from(u32_at(b, at + 4)) << 32)
}

impl Header {
    pub fn from_bytes(b: &[u8; HDR_LEN]) -> Header {
        Header {
            src_cid: u64_at(b, 0),
            dst_cid: u64_at(b, 8),
            src_port: u32_at(b, 16),
            dst_port: u32_at(b, 20),
            len: u32_at(b, 24),
            kind: u16_at(b, 28),
            op: u16_at(b, 30),
            flags: u32_at(b, 32),
            buf_alloc: u32_at(b, 36),
            fwd_cnt: u32_at(b, 40),
        }
    }

    pub fn to_bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.kind.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// The reset a host sends in answer to `self` (ports swapped, no payload).
    pub fn reset_reply(&self, guest_cid: u64) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: self.dst_port,
            dst_port: self.src_port,
            kind: TYPE_STREAM,
            op: OP_RST,
            ..Header::default()
        }
    }
}

/// Why a chain does not carry a valid packet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    #[error("empty chain")]
    Empty,
    #[error("chain of more than {MAX_DESCS} descriptors")]
    TooManyDescriptors,
    #[error("a device-writable buffer in a transmit chain")]
    WritableInTx,
    #[error("a device-readable buffer in a receive chain")]
    ReadableInRx,
    #[error("chain of {0} bytes cannot hold a packet header")]
    Short(u64),
    #[error("payload length {len} beyond the chain's {avail} bytes")]
    LenBeyondChain { len: u32, avail: u64 },
    #[error("payload length {0} above the {MAX_PAYLOAD}-byte limit")]
    TooLong(u32),
    #[error("buffer outside guest memory")]
    Memory,
}

/// A packet the guest sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxPacket {
    pub hdr: Header,
    pub payload: Vec<u8>,
}

fn total_len(descs: &[Descriptor]) -> u64 {
    descs.iter().map(|d| u64::from(d.len())).sum()
}

fn check_chain(descs: &[Descriptor], writable: bool) -> Result<u64, PacketError> {
    if descs.is_empty() {
        return Err(PacketError::Empty);
    }
    if descs.len() > MAX_DESCS {
        return Err(PacketError::TooManyDescriptors);
    }
    if descs.iter().any(|d| d.is_write_only() != writable) {
        return Err(if writable {
            PacketError::ReadableInRx
        } else {
            PacketError::WritableInTx
        });
    }
    let total = total_len(descs);
    if total < HDR_LEN as u64 {
        return Err(PacketError::Short(total));
    }
    Ok(total)
}

/// Walks the bytes `[offset, offset + len)` of a chain as (guest address, length) pieces.
fn pieces(descs: &[Descriptor], mut offset: u64, mut len: usize) -> Vec<(GuestAddress, usize)> {
    let mut out = Vec::new();
    for d in descs {
        if len == 0 {
            break;
        }
        let dlen = u64::from(d.len());
        if offset >= dlen {
            offset -= dlen;
            continue;
        }
        let n = usize::try_from(dlen - offset)
            .unwrap_or(usize::MAX)
            .min(len);
        out.push((d.addr().unchecked_add(offset), n));
        offset = 0;
        len -= n;
    }
    out
}

fn read_at<M: Bytes<GuestAddress>>(
    mem: &M,
    descs: &[Descriptor],
    offset: u64,
    out: &mut [u8],
) -> Result<(), PacketError> {
    let mut done = 0;
    for (addr, n) in pieces(descs, offset, out.len()) {
        mem.read_slice(&mut out[done..done + n], addr)
            .map_err(|_| PacketError::Memory)?;
        done += n;
    }
    Ok(())
}

fn write_at<M: Bytes<GuestAddress>>(
    mem: &M,
    descs: &[Descriptor],
    offset: u64,
    data: &[u8],
) -> Result<(), PacketError> {
    let mut done = 0;
    for (addr, n) in pieces(descs, offset, data.len()) {
        mem.write_slice(&data[done..done + n], addr)
            .map_err(|_| PacketError::Memory)?;
        done += n;
    }
    Ok(())
}

/// Reads the packet of a transmit chain: device-readable buffers holding a header and `len`
/// payload bytes. Lengths are checked against the chain and the payload limit before anything
/// is allocated.
pub fn read_tx<M: Bytes<GuestAddress>>(
    mem: &M,
    descs: &[Descriptor],
) -> Result<TxPacket, PacketError> {
    let total = check_chain(descs, false)?;
    let mut raw = [0u8; HDR_LEN];
    read_at(mem, descs, 0, &mut raw)?;
    let hdr = Header::from_bytes(&raw);
    let avail = total - HDR_LEN as u64;
    if u64::from(hdr.len) > avail {
        return Err(PacketError::LenBeyondChain {
            len: hdr.len,
            avail,
        });
    }
    let len = usize::try_from(hdr.len).unwrap_or(usize::MAX);
    if len > MAX_PAYLOAD {
        return Err(PacketError::TooLong(hdr.len));
    }
    let mut payload = vec![0u8; len];
    read_at(mem, descs, HDR_LEN as u64, &mut payload)?;
    Ok(TxPacket { hdr, payload })
}

/// Payload bytes a receive chain can take after the header (capped at [`MAX_PAYLOAD`]).
pub fn rx_room(descs: &[Descriptor]) -> Result<usize, PacketError> {
    let total = check_chain(descs, true)?;
    let room = usize::try_from(total - HDR_LEN as u64).unwrap_or(usize::MAX);
    Ok(room.min(MAX_PAYLOAD))
}

/// Writes a packet into a receive chain; `hdr.len` is set from `payload`. Returns the bytes
/// used.
pub fn write_rx<M: Bytes<GuestAddress>>(
    mem: &M,
    descs: &[Descriptor],
    hdr: &Header,
    payload: &[u8],
) -> Result<u32, PacketError> {
    let room = rx_room(descs)?;
    if payload.len() > room {
        return Err(PacketError::LenBeyondChain {
            len: u32::try_from(payload.len()).unwrap_or(u32::MAX),
            avail: room as u64,
        });
    }
    let hdr = Header {
        len: u32::try_from(payload.len()).unwrap_or(u32::MAX),
        ..*hdr
    };
    write_at(mem, descs, 0, &hdr.to_bytes())?;
    write_at(mem, descs, HDR_LEN as u64, payload)?;
    Ok(u32::try_from(HDR_LEN + payload.len()).unwrap_or(u32::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::GuestMemoryMmap;

    const F_WRITE: u16 = 2;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    fn hdr(len: u32) -> Header {
        Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 1000,
            dst_port: 52,
            len,
            kind: TYPE_STREAM,
            op: OP_RW,
            flags: 0,
            buf_alloc: 4096,
            fwd_cnt: 7,
        }
    }

    #[test]
    fn header_round_trips_through_its_byte_layout() {
        let h = hdr(5);
        let bytes = h.to_bytes();
        assert_eq!(&bytes[0..8], &3u64.to_le_bytes());
        assert_eq!(&bytes[30..32], &OP_RW.to_le_bytes());
        assert_eq!(Header::from_bytes(&bytes), h);
    }

    #[test]
    fn tx_packet_split_across_descriptors_is_read_whole() {
        let m = mem();
        m.write_slice(&hdr(6).to_bytes()[..20], GuestAddress(0x1000))
            .unwrap();
        m.write_slice(&hdr(6).to_bytes()[20..], GuestAddress(0x2000))
            .unwrap();
        m.write_slice(b"hello!", GuestAddress(0x3000)).unwrap();
        let descs = [
            Descriptor::new(0x1000, 20, 0, 0),
            Descriptor::new(0x2000, 24, 0, 0),
            Descriptor::new(0x3000, 100, 0, 0),
        ];
        let pkt = read_tx(&m, &descs).unwrap();
        assert_eq!(pkt.hdr, hdr(6));
        assert_eq!(pkt.payload, b"hello!");
    }

    #[test]
    fn hostile_tx_chains_are_refused_before_allocating() {
        let m = mem();
        m.write_slice(&hdr(u32::MAX).to_bytes(), GuestAddress(0x1000))
            .unwrap();
        let beyond = [Descriptor::new(0x1000, 64, 0, 0)];
        assert_eq!(
            read_tx(&m, &beyond),
            Err(PacketError::LenBeyondChain {
                len: u32::MAX,
                avail: 20
            })
        );
        m.write_slice(&hdr(70_000).to_bytes(), GuestAddress(0x1000))
            .unwrap();
        let big = [Descriptor::new(0x1000, 100_000, 0, 0)];
        assert_eq!(read_tx(&m, &big), Err(PacketError::TooLong(70_000)));
        let short = [Descriptor::new(0x1000, 43, 0, 0)];
        assert_eq!(read_tx(&m, &short), Err(PacketError::Short(43)));
        let zero = [Descriptor::new(0x1000, 0, 0, 0)];
        assert_eq!(read_tx(&m, &zero), Err(PacketError::Short(0)));
        let writable = [Descriptor::new(0x1000, 64, F_WRITE, 0)];
        assert_eq!(read_tx(&m, &writable), Err(PacketError::WritableInTx));
        let outside = [Descriptor::new(0xfff_0000, 64, 0, 0)];
        assert_eq!(read_tx(&m, &outside), Err(PacketError::Memory));
        let many = vec![Descriptor::new(0x1000, 1, 0, 0); MAX_DESCS + 1];
        assert_eq!(read_tx(&m, &many), Err(PacketError::TooManyDescriptors));
        assert_eq!(read_tx(&m, &[]), Err(PacketError::Empty));
    }

    #[test]
    fn tx_lengths_summing_past_u32_do_not_wrap() {
        let m = mem();
        m.write_slice(&hdr(16).to_bytes(), GuestAddress(0x1000))
            .unwrap();
        m.write_slice(b"0123456789abcdef", GuestAddress(0x1000 + 44))
            .unwrap();
        // Two descriptors of 4 GiB - 1: the sum needs 33 bits; only the bytes asked for are read.
        let descs = [
            Descriptor::new(0x1000, u32::MAX, 0, 0),
            Descriptor::new(0x1000, u32::MAX, 0, 0),
        ];
        assert_eq!(read_tx(&m, &descs).unwrap().payload, b"0123456789abcdef");
        m.write_slice(&hdr(u32::MAX).to_bytes(), GuestAddress(0x1000))
            .unwrap();
        assert_eq!(read_tx(&m, &descs), Err(PacketError::TooLong(u32::MAX)));
    }

    #[test]
    fn rx_packet_fills_header_then_payload_across_descriptors() {
        let m = mem();
        let descs = [
            Descriptor::new(0x1000, 44, F_WRITE, 0),
            Descriptor::new(0x2000, 3, F_WRITE, 0),
            Descriptor::new(0x3000, 100, F_WRITE, 0),
        ];
        assert_eq!(rx_room(&descs), Ok(103));
        let used = write_rx(&m, &descs, &hdr(0), b"abcdef").unwrap();
        assert_eq!(used, 50);
        let mut raw = [0u8; HDR_LEN];
        m.read_slice(&mut raw, GuestAddress(0x1000)).unwrap();
        assert_eq!(Header::from_bytes(&raw).len, 6);
        let mut a = [0u8; 3];
        m.read_slice(&mut a, GuestAddress(0x2000)).unwrap();
        let mut b = [0u8; 3];
        m.read_slice(&mut b, GuestAddress(0x3000)).unwrap();
        assert_eq!((&a, &b), (b"abc", b"def"));
    }

    #[test]
    fn hostile_rx_chains_are_refused() {
        let m = mem();
        let small = [Descriptor::new(0x1000, 10, F_WRITE, 0)];
        assert_eq!(rx_room(&small), Err(PacketError::Short(10)));
        let readable = [Descriptor::new(0x1000, 4096, 0, 0)];
        assert_eq!(rx_room(&readable), Err(PacketError::ReadableInRx));
        let outside = [Descriptor::new(0xfff_0000, 4096, F_WRITE, 0)];
        assert_eq!(
            write_rx(&m, &outside, &hdr(0), b"x"),
            Err(PacketError::Memory)
        );
        let huge = [Descriptor::new(0x1000, u32::MAX, F_WRITE, 0)];
        assert_eq!(rx_room(&huge), Ok(MAX_PAYLOAD));
        let exact = [Descriptor::new(0x1000, 44, F_WRITE, 0)];
        assert!(write_rx(&m, &exact, &hdr(0), b"x").is_err());
    }
}
