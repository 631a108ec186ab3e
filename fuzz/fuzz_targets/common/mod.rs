//! Pieces shared by the virtio targets: guest memory filled from the input, queues placed where
//! the input says, a fake network backend and a scratch drive.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use flick::config::{RateLimiterConfig, TokenBucketConfig};
use flick::devices::rate_limiter::{RateLimiter, SavedLimits};
use flick::devices::virtio::block::{Backing, Block, SavedDrive, SECTOR_SIZE};
use flick::devices::virtio::net::{Net, NetBackend, SavedNet};
use flick::devices::virtio::Interrupt;
use virtio_queue::{Queue, QueueT};
use flick::memory::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Guest RAM: two regions with a hole between them, so buffers can straddle a region's end or
/// fall into the hole.
pub const RAM: [(u64, usize); 2] = [(0, 0x8000), (0x1_0000, 0x8000)];
/// Sectors of the scratch drive.
pub const DRIVE_SECTORS: u64 = 16;

/// Reads fields off the front of the input; missing bytes read as zero.
pub struct Input<'a>(pub &'a [u8]);

impl<'a> Input<'a> {
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.0.len());
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        head
    }
    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let b = self.bytes(N);
        out[..b.len()].copy_from_slice(b);
        out
    }
    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }
    /// A guest address: mostly inside or near RAM, sometimes anything at all.
    pub fn addr(&mut self) -> u64 {
        let raw = self.u32();
        if raw & 0x8000_0000 != 0 {
            // Far away or near the top of the address space.
            u64::from(raw) << 32 | u64::from(raw)
        } else {
            u64::from(raw & 0x1_ffff)
        }
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Guest memory with `contents` copied to the start of each region in turn.
pub fn guest_memory(contents: &[u8]) -> GuestMemoryMmap {
    let ranges: Vec<(GuestAddress, usize)> =
        RAM.iter().map(|&(a, l)| (GuestAddress(a), l)).collect();
    let mem = GuestMemoryMmap::from_ranges(&ranges).expect("guest memory");
    let mut rest = contents;
    for &(start, len) in &RAM {
        let n = rest.len().min(len);
        mem.write_slice(&rest[..n], GuestAddress(start))
            .expect("write guest memory");
        rest = &rest[n..];
    }
    mem
}

/// A queue of `max_size` set up as a driver would, from the input: size and ring addresses.
/// `None` when the queue is not valid in `mem` (the transport refuses to activate it).
pub fn queue_from(input: &mut Input<'_>, max_size: u16, mem: &GuestMemoryMmap) -> Option<Queue> {
    let mut queue = Queue::new(max_size).ok()?;
    queue.set_size(input.u16());
    let desc = input.addr();
    let avail = input.addr();
    let used = input.addr();
    queue.set_desc_table_address(Some(desc as u32), Some((desc >> 32) as u32));
    queue.set_avail_ring_address(Some(avail as u32), Some((avail >> 32) as u32));
    queue.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
    queue.set_event_idx(input.u8() & 1 != 0);
    queue.set_ready(true);
    queue.is_valid(mem).then_some(queue)
}

/// A rate limiter: none, or tight buckets from the input so throttling paths run.
pub fn limiter(input: &mut Input<'_>) -> RateLimiter {
    let kind = input.u8();
    let size = u64::from(input.u16());
    let bucket = TokenBucketConfig {
        size,
        refill_time: 1000,
        one_time_burst: None,
    };
    let config = RateLimiterConfig {
        bandwidth: (kind & 1 != 0).then_some(bucket),
        ops: (kind & 2 != 0).then_some(TokenBucketConfig {
            size: size & 7,
            ..bucket
        }),
    };
    RateLimiter::new(Some(&config)).expect("timerfd")
}

pub fn interrupt() -> Arc<Interrupt> {
    Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).expect("eventfd")))
}

/// A host file of [`DRIVE_SECTORS`] sectors, created once per process (`ro` picks one of two).
fn drive_file(read_only: bool) -> &'static PathBuf {
    static FILES: OnceLock<[PathBuf; 2]> = OnceLock::new();
    let files = FILES.get_or_init(|| {
        let dir = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let make = |tag: &str| {
            let path = dir.join(format!("flick-fuzz-{}-{tag}.img", std::process::id()));
            let content: Vec<u8> = (0..DRIVE_SECTORS * SECTOR_SIZE).map(|i| i as u8).collect();
            std::fs::write(&path, content).expect("scratch drive");
            path
        };
        [make("rw"), make("ro")]
    });
    &files[usize::from(read_only)]
}

/// A drive on the scratch file; each process keeps its files (they are small).
pub fn block(read_only: bool, writeback: bool, limiter: RateLimiter) -> Block {
    let path = drive_file(read_only)
        .to_str()
        .expect("utf-8 path")
        .to_string();
    let backing = Backing::open(&path, read_only).expect("open scratch drive");
    let saved = SavedDrive {
        id: "fuzz_disk".into(),
        path,
        read_only,
        root: false,
        partuuid: None,
        writeback,
        limits: SavedLimits::default(),
    };
    Block::new(saved, backing, limiter)
}

/// A network backend whose incoming frames come from the input and which accepts every frame.
#[derive(Debug, Default)]
pub struct FakeBackend {
    pub incoming: VecDeque<Vec<u8>>,
    pub sent: usize,
    /// Fail writes (a TAP that is down).
    pub fail_writes: bool,
}

impl NetBackend for FakeBackend {
    fn read_frame(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let frame = self
            .incoming
            .pop_front()
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::WouldBlock))?;
        // A TAP truncates frames larger than the read buffer.
        let n = frame.len().min(buf.len());
        buf[..n].copy_from_slice(&frame[..n]);
        Ok(n)
    }
    fn write_frame(&mut self, frame: &[u8]) -> std::io::Result<usize> {
        if self.fail_writes {
            return Err(std::io::Error::from_raw_os_error(libc_eio()));
        }
        self.sent += 1;
        Ok(frame.len())
    }
    fn set_offloads(&mut self, _: u32) -> std::io::Result<()> {
        Ok(())
    }
    fn fd(&self) -> RawFd {
        -1
    }
    fn name(&self) -> &str {
        "fuzz"
    }
}

const fn libc_eio() -> i32 {
    5
}

/// An interface on `backend`, with a MAC and MTU when `configured`.
pub fn net(
    backend: FakeBackend,
    configured: bool,
    limiters: (RateLimiter, RateLimiter),
) -> Net<FakeBackend> {
    let saved = SavedNet {
        id: "fuzz_net".into(),
        tap: "fuzz".into(),
        mac: configured.then_some([6, 0, 0xac, 0x10, 0, 2]),
        mtu: configured.then_some(1500),
        rx_limits: SavedLimits::default(),
        tx_limits: SavedLimits::default(),
        mmds: None,
    };
    Net::new(saved, backend, limiters)
}
