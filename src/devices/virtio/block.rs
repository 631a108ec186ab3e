//! virtio-blk backed by a host file: read, write, flush, get-id; read-only drives; capacity from
//! the file size. Requests are decoded and checked in full before any I/O, so a malformed chain
//! from a hostile guest completes with an error status (or, without a status byte, with a zero
//! length) and never touches memory outside the guest's.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use crate::devices::rate_limiter::RateLimiter;

use super::{
    ActivateError, Activation, Interrupt, VirtioDevice, INT_VRING, TYPE_BLOCK, VIRTIO_F_VERSION_1,
};

pub const SECTOR_SIZE: u64 = 512;
const QUEUE_SIZE: u16 = 256;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
const ID_BYTES: usize = 20;
const HEADER_BYTES: u32 = 16;

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("cannot open {0}")]
    Open(String, #[source] std::io::Error),
    #[error("{0} is not a regular file or block device")]
    NotAFile(String),
    #[error("{0} is empty: a drive needs at least one 512-byte sector")]
    Empty(String),
    #[error("{0} is locked by another process")]
    Locked(String),
}

/// Counters of one drive, read by the metrics code.
#[derive(Debug, Default)]
pub struct BlockStats {
    pub read_ops: AtomicU64,
    pub write_ops: AtomicU64,
    pub flush_ops: AtomicU64,
    pub read_bytes: AtomicU64,
    pub write_bytes: AtomicU64,
    /// Requests refused as malformed (bad chain, direction, bounds, type).
    pub invalid_requests: AtomicU64,
    /// Host I/O failures.
    pub io_errors: AtomicU64,
}

/// The host side of a drive.
#[derive(Debug)]
pub struct Backing {
    file: File,
    pub path: String,
    pub capacity_sectors: u64,
    pub read_only: bool,
}

impl Backing {
    /// Opens and locks `path` (exclusively for writable drives, shared for read-only ones).
    pub fn open(path: &str, read_only: bool) -> Result<Backing, BlockError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|e| BlockError::Open(path.into(), e))?;
        let meta = file
            .metadata()
            .map_err(|e| BlockError::Open(path.into(), e))?;
        use std::os::unix::fs::FileTypeExt;
        if !meta.is_file() && !meta.file_type().is_block_device() {
            return Err(BlockError::NotAFile(path.into()));
        }
        let mode = if read_only {
            libc::LOCK_SH
        } else {
            libc::LOCK_EX
        };
        // SAFETY: flock on a valid fd owned by `file`; the lock is released when it closes.
        if unsafe { libc::flock(file.as_raw_fd(), mode | libc::LOCK_NB) } != 0 {
            return Err(BlockError::Locked(path.into()));
        }
        let mut probe = &file;
        let size = probe
            .seek(SeekFrom::End(0))
            .map_err(|e| BlockError::Open(path.into(), e))?;
        let capacity_sectors = size / SECTOR_SIZE;
        if capacity_sectors == 0 {
            return Err(BlockError::Empty(path.into()));
        }
        if !size.is_multiple_of(SECTOR_SIZE) {
            tracing::warn!(
                "{path}: size is not a multiple of 512; the last partial sector is ignored"
            );
        }
        Ok(Backing {
            file,
            path: path.into(),
            capacity_sectors,
            read_only,
        })
    }
}

/// The outcome of one request: bytes written into guest buffers (the used length).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    pub used_len: u32,
    /// Status byte written, if the chain had a place for it.
    pub status: Option<u8>,
}

/// A decoded request, checked against the chain's shape.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Request {
    In { sector: u64, data: Vec<(u64, u32)> },
    Out { sector: u64, data: Vec<(u64, u32)> },
    Flush,
    GetId { data: Vec<(u64, u32)> },
    Unsupported,
}

/// Why a chain was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Invalid {
    /// Cannot even report a status: complete with length 0.
    NoStatus,
    /// Report `status` in the status byte.
    Status(u8),
}

fn decode(mem: &GuestMemoryMmap, descs: &[Descriptor], capacity: u64) -> Result<Request, Invalid> {
    let (last, rest) = descs.split_last().ok_or(Invalid::NoStatus)?;
    if !last.is_write_only() || last.len() < 1 || rest.is_empty() {
        return Err(Invalid::NoStatus);
    }
    let (header, data) = rest.split_first().ok_or(Invalid::NoStatus)?;
    if header.is_write_only() || header.len() < HEADER_BYTES {
        return Err(Invalid::Status(S_IOERR));
    }
    let kind: u32 = mem
        .read_obj(header.addr())
        .map_err(|_| Invalid::Status(S_IOERR))?;
    let sector: u64 = mem
        .read_obj(header.addr().unchecked_add(8))
        .map_err(|_| Invalid::Status(S_IOERR))?;
    let ranges: Vec<(u64, u32)> = data.iter().map(|d| (d.addr().0, d.len())).collect();
    let all_write_only = data.iter().all(|d| d.is_write_only());
    let all_readable = data.iter().all(|d| !d.is_write_only());
    let check_rw = |sector: u64| -> Result<(), Invalid> {
        let total: u64 = ranges.iter().map(|r| u64::from(r.1)).sum();
        let sectors = total / SECTOR_SIZE;
        let fits = sector
            .checked_add(sectors)
            .is_some_and(|end| end <= capacity);
        if !total.is_multiple_of(SECTOR_SIZE) || !fits {
            return Err(Invalid::Status(S_IOERR));
        }
        Ok(())
    };
    match kind {
        T_IN => {
            if !all_write_only {
                return Err(Invalid::Status(S_IOERR));
            }
            check_rw(sector)?;
            Ok(Request::In {
                sector,
                data: ranges,
            })
        }
        T_OUT => {
            if !all_readable {
                return Err(Invalid::Status(S_IOERR));
            }
            check_rw(sector)?;
            Ok(Request::Out {
                sector,
                data: ranges,
            })
        }
        T_FLUSH => Ok(Request::Flush),
        T_GET_ID => {
            if !all_write_only {
                return Err(Invalid::Status(S_IOERR));
            }
            Ok(Request::GetId { data: ranges })
        }
        _ => Ok(Request::Unsupported),
    }
}

/// A virtio-blk device.
pub struct Block {
    pub id: String,
    backing: Backing,
    limiter: RateLimiter,
    flush_on_request: bool,
    features: u64,
    queue_sizes: [u16; 1],
    active: Option<(GuestMemoryMmap, Queue, Arc<Interrupt>)>,
    pub stats: Arc<BlockStats>,
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("id", &self.id)
            .field("backing", &self.backing)
            .finish()
    }
}

impl Block {
    /// `writeback`: offer FLUSH and fdatasync on flush requests (cache_type Writeback).
    pub fn new(id: String, backing: Backing, writeback: bool, limiter: RateLimiter) -> Block {
        let mut features = VIRTIO_F_VERSION_1;
        if backing.read_only {
            features |= VIRTIO_BLK_F_RO;
        }
        if writeback {
            features |= VIRTIO_BLK_F_FLUSH;
        }
        Block {
            id,
            backing,
            limiter,
            flush_on_request: writeback,
            features,
            queue_sizes: [QUEUE_SIZE],
            active: None,
            stats: Arc::new(BlockStats::default()),
        }
    }

    /// Replaces the rate limits (PATCH /drives).
    pub fn set_rate_limiter(&mut self, config: Option<&crate::config::RateLimiterConfig>) {
        self.limiter.update(config);
    }

    pub fn backing_read_only(&self) -> bool {
        self.backing.read_only
    }

    /// Replaces the backing file (PATCH /drives). The caller tells the driver the config changed.
    pub fn swap_backing(&mut self, backing: Backing) {
        self.backing = backing;
    }

    fn serial(&self) -> [u8; ID_BYTES] {
        let mut id = [0u8; ID_BYTES];
        let bytes = self.id.as_bytes();
        let n = bytes.len().min(ID_BYTES);
        id[..n].copy_from_slice(&bytes[..n]);
        id
    }

    fn transfer(&mut self, mem: &GuestMemoryMmap, request: &Request) -> Result<u32, u8> {
        let stats = self.stats.clone();
        match request {
            Request::In { sector, data } | Request::Out { sector, data } => {
                let is_read = matches!(request, Request::In { .. });
                if !is_read && self.backing.read_only {
                    return Err(S_IOERR);
                }
                let file = &mut self.backing.file;
                file.seek(SeekFrom::Start(sector * SECTOR_SIZE))
                    .map_err(|_| S_IOERR)?;
                let mut total = 0u32;
                for &(addr, len) in data {
                    let res = if is_read {
                        mem.read_exact_volatile_from(GuestAddress(addr), file, len as usize)
                    } else {
                        mem.write_all_volatile_to(GuestAddress(addr), file, len as usize)
                    };
                    res.map_err(|_| S_IOERR)?;
                    total += len;
                }
                if is_read {
                    stats.read_ops.fetch_add(1, Ordering::Relaxed);
                    stats
                        .read_bytes
                        .fetch_add(u64::from(total), Ordering::Relaxed);
                    Ok(total)
                } else {
                    stats.write_ops.fetch_add(1, Ordering::Relaxed);
                    stats
                        .write_bytes
                        .fetch_add(u64::from(total), Ordering::Relaxed);
                    Ok(0)
                }
            }
            Request::Flush => {
                stats.flush_ops.fetch_add(1, Ordering::Relaxed);
                if self.flush_on_request && !self.backing.read_only {
                    self.backing.file.sync_data().map_err(|_| S_IOERR)?;
                }
                Ok(0)
            }
            Request::GetId { data } => {
                let serial = self.serial();
                let mut written = 0usize;
                for &(addr, len) in data {
                    let n = (len as usize).min(ID_BYTES - written);
                    mem.write_slice(&serial[written..written + n], GuestAddress(addr))
                        .map_err(|_| S_IOERR)?;
                    written += n;
                }
                Ok(written as u32)
            }
            Request::Unsupported => Err(S_UNSUPP),
        }
    }

    /// Executes one descriptor chain; returns what to put in the used ring.
    pub fn execute(&mut self, mem: &GuestMemoryMmap, descs: &[Descriptor]) -> Completion {
        let status_desc = descs.last().copied();
        let (used, status) = match decode(mem, descs, self.backing.capacity_sectors) {
            Err(Invalid::NoStatus) => {
                self.stats.invalid_requests.fetch_add(1, Ordering::Relaxed);
                return Completion {
                    used_len: 0,
                    status: None,
                };
            }
            Err(Invalid::Status(s)) => {
                self.stats.invalid_requests.fetch_add(1, Ordering::Relaxed);
                (0, s)
            }
            Ok(request) => match self.transfer(mem, &request) {
                Ok(n) => (n, S_OK),
                Err(s) => {
                    if s == S_IOERR {
                        self.stats.io_errors.fetch_add(1, Ordering::Relaxed);
                    }
                    (0, s)
                }
            },
        };
        let Some(status_desc) = status_desc else {
            return Completion {
                used_len: 0,
                status: None,
            };
        };
        if mem.write_obj(status, status_desc.addr()).is_err() {
            return Completion {
                used_len: 0,
                status: None,
            };
        }
        Completion {
            used_len: used + 1,
            status: Some(status),
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // Config space: capacity (le64) only.
        let config = self.backing.capacity_sectors.to_le_bytes();
        super::read_config_bytes(&config, offset, data);
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let mut queues = activation.queues;
        if queues.len() != 1 {
            return Err(ActivateError::QueueCount {
                expected: 1,
                found: queues.len(),
            });
        }
        let queue = queues.remove(0);
        self.active = Some((activation.mem, queue, activation.interrupt));
        Ok(())
    }

    fn is_active(&self) -> bool {
        self.active.is_some()
    }

    fn reset(&mut self) {
        self.active = None;
    }

    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        self.active
            .iter()
            .map(|(_, queue, _)| queue.state())
            .collect()
    }

    fn event_fds(&self) -> Vec<(std::os::fd::RawFd, vmm_sys_util::epoll::EventSet)> {
        vec![(self.limiter.timer_fd(), vmm_sys_util::epoll::EventSet::IN)]
    }

    fn process_fd(&mut self, fd: std::os::fd::RawFd) {
        if fd == self.limiter.timer_fd() {
            self.limiter.timer_fired();
            if self.is_active() {
                self.process_queue(0);
            }
        }
    }

    fn process_queue(&mut self, _index: usize) {
        let Some((mem, mut queue, interrupt)) = self.active.take() else {
            return;
        };
        let mut completed = false;
        while let Some(chain) = queue.pop_descriptor_chain(&mem) {
            let head = chain.head_index();
            let descs: Vec<Descriptor> = chain.collect();
            let bytes: u64 = descs.iter().skip(1).map(|d| u64::from(d.len())).sum();
            if !self.limiter.consume(bytes.saturating_sub(1)) {
                // Throttled: leave the request for when the limiter's timer fires.
                queue.go_to_previous_position();
                break;
            }
            let completion = self.execute(&mem, &descs);
            if queue.add_used(&mem, head, completion.used_len).is_err() {
                self.stats.invalid_requests.fetch_add(1, Ordering::Relaxed);
                break;
            }
            completed = true;
        }
        if completed && queue.needs_notification(&mem).unwrap_or(true) {
            interrupt.raise(INT_VRING);
        }
        self.active = Some((mem, queue, interrupt));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::split::Descriptor as D;

    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;
    const MEM: usize = 1 << 20;

    fn setup(sectors: u64, read_only: bool) -> (Block, GuestMemoryMmap, std::path::PathBuf) {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("flick-blk-{}-{n}", std::process::id()));
        let content: Vec<u8> = (0..sectors * SECTOR_SIZE)
            .map(|i| (i / SECTOR_SIZE) as u8)
            .collect();
        std::fs::write(&path, content).unwrap();
        let backing = Backing::open(path.to_str().unwrap(), read_only).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
        let limiter = RateLimiter::new(None).unwrap();
        (
            Block::new("disk_0".into(), backing, true, limiter),
            mem,
            path,
        )
    }

    fn header(mem: &GuestMemoryMmap, addr: u64, kind: u32, sector: u64) {
        mem.write_obj(kind, GuestAddress(addr)).unwrap();
        mem.write_obj(sector, GuestAddress(addr + 8)).unwrap();
    }

    fn chain(parts: &[(u64, u32, u16)]) -> Vec<D> {
        parts.iter().map(|&(a, l, f)| D::new(a, l, f, 0)).collect()
    }

    #[test]
    fn read_copies_sectors_into_guest_memory() {
        let (mut blk, mem, _p) = setup(8, false);
        header(&mem, 0x1000, T_IN, 2);
        let c = blk.execute(
            &mem,
            &chain(&[
                (0x1000, 16, F_NEXT),
                (0x2000, 1024, F_WRITE),
                (0x3000, 1, F_WRITE),
            ]),
        );
        assert_eq!(
            c,
            Completion {
                used_len: 1025,
                status: Some(S_OK)
            }
        );
        let mut buf = [0u8; 1024];
        mem.read_slice(&mut buf, GuestAddress(0x2000)).unwrap();
        assert!(buf[..512].iter().all(|&b| b == 2) && buf[512..].iter().all(|&b| b == 3));
    }

    #[test]
    fn write_reaches_the_host_file() {
        let (mut blk, mem, path) = setup(8, false);
        header(&mem, 0x1000, T_OUT, 1);
        mem.write_slice(&[0xab; 512], GuestAddress(0x2000)).unwrap();
        let c = blk.execute(
            &mem,
            &chain(&[(0x1000, 16, 0), (0x2000, 512, 0), (0x3000, 1, F_WRITE)]),
        );
        assert_eq!(c.status, Some(S_OK));
        let file = std::fs::read(path).unwrap();
        assert!(file[512..1024].iter().all(|&b| b == 0xab));
        assert!(file[..512].iter().all(|&b| b == 0));
    }

    #[test]
    fn write_to_read_only_drive_fails_and_leaves_file_untouched() {
        let (mut blk, mem, path) = setup(4, true);
        let before = std::fs::read(&path).unwrap();
        header(&mem, 0x1000, T_OUT, 0);
        let c = blk.execute(
            &mem,
            &chain(&[(0x1000, 16, 0), (0x2000, 512, 0), (0x3000, 1, F_WRITE)]),
        );
        assert_eq!(c.status, Some(S_IOERR));
        assert_eq!(std::fs::read(&path).unwrap(), before);
        assert_ne!(blk.features() & VIRTIO_BLK_F_RO, 0);
    }

    #[test]
    fn access_beyond_capacity_is_an_io_error() {
        let (mut blk, mem, _p) = setup(4, false);
        header(&mem, 0x1000, T_IN, 3);
        let c = blk.execute(
            &mem,
            &chain(&[
                (0x1000, 16, 0),
                (0x2000, 1024, F_WRITE),
                (0x3000, 1, F_WRITE),
            ]),
        );
        assert_eq!(c.status, Some(S_IOERR));
        header(&mem, 0x1000, T_IN, u64::MAX);
        let c = blk.execute(
            &mem,
            &chain(&[
                (0x1000, 16, 0),
                (0x2000, 512, F_WRITE),
                (0x3000, 1, F_WRITE),
            ]),
        );
        assert_eq!(c.status, Some(S_IOERR));
    }

    #[test]
    fn buffer_outside_guest_memory_is_an_io_error() {
        let (mut blk, mem, _p) = setup(4, false);
        header(&mem, 0x1000, T_IN, 0);
        let far = 0xf000_0000_0000;
        let c = blk.execute(
            &mem,
            &chain(&[(0x1000, 16, 0), (far, 512, F_WRITE), (0x3000, 1, F_WRITE)]),
        );
        assert_eq!(c.status, Some(S_IOERR));
        let straddling = (MEM - 256) as u64;
        let c = blk.execute(
            &mem,
            &chain(&[
                (0x1000, 16, 0),
                (straddling, 512, F_WRITE),
                (0x3000, 1, F_WRITE),
            ]),
        );
        assert_eq!(c.status, Some(S_IOERR));
    }

    #[test]
    fn wrong_data_direction_is_refused() {
        let (mut blk, mem, _p) = setup(4, false);
        header(&mem, 0x1000, T_IN, 0);
        let c = blk.execute(
            &mem,
            &chain(&[(0x1000, 16, 0), (0x2000, 512, 0), (0x3000, 1, F_WRITE)]),
        );
        assert_eq!(c.status, Some(S_IOERR));
    }

    #[test]
    fn unknown_request_type_is_unsupported() {
        let (mut blk, mem, _p) = setup(4, false);
        header(&mem, 0x1000, 0x99, 0);
        let c = blk.execute(&mem, &chain(&[(0x1000, 16, 0), (0x3000, 1, F_WRITE)]));
        assert_eq!(c.status, Some(S_UNSUPP));
    }

    #[test]
    fn chain_without_status_descriptor_completes_with_zero_length() {
        let (mut blk, mem, _p) = setup(4, false);
        header(&mem, 0x1000, T_IN, 0);
        let c = blk.execute(&mem, &chain(&[(0x1000, 16, 0), (0x2000, 512, 0)]));
        assert_eq!(
            c,
            Completion {
                used_len: 0,
                status: None
            }
        );
        assert_eq!(
            blk.execute(&mem, &[]),
            Completion {
                used_len: 0,
                status: None
            }
        );
    }

    #[test]
    fn short_header_is_an_io_error() {
        let (mut blk, mem, _p) = setup(4, false);
        let c = blk.execute(&mem, &chain(&[(0x1000, 8, 0), (0x3000, 1, F_WRITE)]));
        assert_eq!(c.status, Some(S_IOERR));
    }

    #[test]
    fn get_id_returns_the_drive_id() {
        let (mut blk, mem, _p) = setup(4, false);
        header(&mem, 0x1000, T_GET_ID, 0);
        let c = blk.execute(
            &mem,
            &chain(&[(0x1000, 16, 0), (0x2000, 20, F_WRITE), (0x3000, 1, F_WRITE)]),
        );
        assert_eq!(
            c,
            Completion {
                used_len: 21,
                status: Some(S_OK)
            }
        );
        let mut id = [0u8; 20];
        mem.read_slice(&mut id, GuestAddress(0x2000)).unwrap();
        assert_eq!(&id[..6], b"disk_0");
        assert!(id[6..].iter().all(|&b| b == 0));
    }

    #[test]
    fn flush_succeeds() {
        let (mut blk, mem, _p) = setup(4, false);
        header(&mem, 0x1000, T_FLUSH, 0);
        let c = blk.execute(&mem, &chain(&[(0x1000, 16, 0), (0x3000, 1, F_WRITE)]));
        assert_eq!(c.status, Some(S_OK));
        assert_eq!(blk.stats.flush_ops.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn capacity_is_in_config_space() {
        let (blk, _mem, _p) = setup(6, false);
        let mut data = [0u8; 8];
        blk.read_config(0, &mut data);
        assert_eq!(u64::from_le_bytes(data), 6);
        let mut beyond = [0xffu8; 4];
        blk.read_config(8, &mut beyond);
        assert_eq!(beyond, [0; 4]);
    }

    #[test]
    fn empty_file_is_refused() {
        let path = std::env::temp_dir().join(format!("flick-blk-empty-{}", std::process::id()));
        std::fs::write(&path, b"").unwrap();
        let err = Backing::open(path.to_str().unwrap(), false).unwrap_err();
        assert!(matches!(err, BlockError::Empty(_)));
    }

    #[test]
    fn second_writable_open_of_the_same_file_is_refused_as_locked() {
        let (_blk, _mem, path) = setup(2, false);
        let err = Backing::open(path.to_str().unwrap(), false).unwrap_err();
        assert!(matches!(err, BlockError::Locked(_)), "{err}");
    }
}
