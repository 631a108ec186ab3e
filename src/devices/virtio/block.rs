//! virtio-blk backed by a host file: read, write, flush, get-id; read-only drives; capacity from
//! the file size. Requests are decoded and checked in full before any I/O, so a malformed chain
//! from a hostile guest completes with an error status (or, without a status byte, with a zero
//! length) and never touches memory outside the guest's.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::memory::GuestMemoryMmap;
use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_blk as vb;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};

use crate::config::{CacheType, DriveConfig, VmConfig};
use crate::devices::rate_limiter::{LimiterBudget, RateLimiter, SavedLimits};
use crate::metrics::{counters, Sample, THROTTLED};

use super::{
    from_saved, to_saved, ActivateError, Activation, ConfigSpace, DeviceError, DeviceKind,
    DeviceUpdate, Interrupt, NewDevice, Overrides, VirtioDevice, INT_VRING, TYPE_BLOCK,
    VIRTIO_F_VERSION_1,
};

pub const SECTOR_SIZE: u64 = 512;
const QUEUE_SIZE: u16 = 256;
const VIRTIO_BLK_F_RO: u64 = 1 << vb::VIRTIO_BLK_F_RO;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << vb::VIRTIO_BLK_F_FLUSH;
const T_IN: u32 = vb::VIRTIO_BLK_T_IN;
const T_OUT: u32 = vb::VIRTIO_BLK_T_OUT;
const T_FLUSH: u32 = vb::VIRTIO_BLK_T_FLUSH;
const T_GET_ID: u32 = vb::VIRTIO_BLK_T_GET_ID;
// The status values are 0, 1 and 2 and the id is 20 bytes: the casts are exact.
#[allow(clippy::cast_possible_truncation)]
const S_OK: u8 = vb::VIRTIO_BLK_S_OK as u8;
#[allow(clippy::cast_possible_truncation)]
const S_IOERR: u8 = vb::VIRTIO_BLK_S_IOERR as u8;
#[allow(clippy::cast_possible_truncation)]
const S_UNSUPP: u8 = vb::VIRTIO_BLK_S_UNSUPP as u8;
const ID_BYTES: usize = vb::VIRTIO_BLK_ID_BYTES as usize;
const HEADER_BYTES: u32 = 16;

/// The block device kind, for the VMM's device registry.
pub const KIND: DeviceKind = DeviceKind {
    name: "block",
    noun: "drive",
    id_label: "drive",
    open: open_drives,
    reopen: reopen_drive,
    describe: describe_drive,
};

/// A drive's settings as snapshots store them (independent of the API's field names).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedDrive {
    pub id: String,
    pub path: String,
    pub read_only: bool,
    pub root: bool,
    pub partuuid: Option<String>,
    pub writeback: bool,
    pub limits: SavedLimits,
}

/// What a snapshot keeps of a drive beyond its queues.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct BlockState {
    limiter: LimiterBudget,
}

fn saved_from_config(config: &DriveConfig) -> SavedDrive {
    SavedDrive {
        id: config.drive_id.clone(),
        path: config.path_on_host.clone(),
        read_only: config.is_read_only,
        root: config.is_root_device,
        partuuid: config.partuuid.clone(),
        writeback: config.cache_type == CacheType::Writeback,
        limits: SavedLimits::from(config.rate_limiter.as_ref()),
    }
}

fn new_device(saved: SavedDrive) -> Result<NewDevice, DeviceError> {
    let backing = Backing::open(&saved.path, saved.read_only)?;
    let limiter =
        RateLimiter::new(saved.limits.to_config().as_ref()).map_err(DeviceError::Timer)?;
    let id = saved.id.clone();
    let block = Block::new(saved, backing, limiter);
    Ok(NewDevice {
        id,
        device: Arc::new(Mutex::new(block)),
        cmdline: Vec::new(),
    })
}

/// Opens every configured drive, root device first (so it becomes `/dev/vda`).
fn open_drives(config: &VmConfig, _: Overrides<'_>) -> Result<Vec<NewDevice>, DeviceError> {
    let drives = &config.drives;
    let mut ordered: Vec<&DriveConfig> = drives.iter().filter(|d| d.is_root_device).collect();
    ordered.extend(drives.iter().filter(|d| !d.is_root_device));
    let mut devices = Vec::with_capacity(ordered.len());
    for (n, drive) in ordered.into_iter().enumerate() {
        let mut device =
            new_device(saved_from_config(drive)).map_err(|e| e.of(KIND.noun, &drive.drive_id))?;
        if drive.is_root_device {
            let root = match &drive.partuuid {
                Some(uuid) => format!("root=PARTUUID={uuid}"),
                None => format!("root=/dev/vd{}", disk_letter(n)),
            };
            let mode = if drive.is_read_only { "ro" } else { "rw" };
            device.cmdline = vec![root, mode.into()];
        }
        devices.push(device);
    }
    Ok(devices)
}

/// `a` for the first disk, `b` for the second, ...; the registry allows far fewer than 26.
fn disk_letter(index: usize) -> char {
    let offset = u8::try_from(index % 26).unwrap_or(0);
    char::from(b'a' + offset)
}

fn reopen_drive(saved: &serde_json::Value, _: Overrides<'_>) -> Result<NewDevice, DeviceError> {
    let saved: SavedDrive = from_saved(KIND.name, saved)?;
    let id = saved.id.clone();
    new_device(saved).map_err(|e| e.of(KIND.noun, &id))
}

fn describe_drive(saved: &serde_json::Value, config: &mut VmConfig) -> Result<(), DeviceError> {
    let saved: SavedDrive = from_saved(KIND.name, saved)?;
    let drive = DriveConfig {
        drive_id: saved.id,
        path_on_host: saved.path,
        is_root_device: saved.root,
        is_read_only: saved.read_only,
        partuuid: saved.partuuid,
        cache_type: if saved.writeback {
            CacheType::Writeback
        } else {
            CacheType::Unsafe
        },
        io_engine: Default::default(),
        rate_limiter: saved.limits.to_config(),
    };
    match config
        .drives
        .iter_mut()
        .find(|d| d.drive_id == drive.drive_id)
    {
        Some(existing) => *existing = drive,
        None => config.drives.push(drive),
    }
    Ok(())
}

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
        let capacity_sectors = capacity(&file, path)?;
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
        // The used length (data plus the status byte) must fit the used ring's u32.
        let reportable = total < u64::from(u32::MAX);
        if !total.is_multiple_of(SECTOR_SIZE) || !fits || !reportable {
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
    /// Its settings, kept current (a swapped file, new limits) for snapshots.
    saved: SavedDrive,
    backing: Backing,
    limiter: RateLimiter,
    features: u64,
    queue_sizes: [u16; 1],
    config_space: Arc<ConfigSpace>,
    active: Option<(GuestMemoryMmap, Queue, Arc<Interrupt>)>,
    pub stats: Arc<BlockStats>,
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("id", &self.saved.id)
            .field("backing", &self.backing)
            .finish()
    }
}

/// Config space: capacity in sectors (le64) only.
/// The size of `file` in whole sectors; an empty file is refused.
fn capacity(file: &File, path: &str) -> Result<u64, BlockError> {
    let mut probe = file;
    let size = probe
        .seek(SeekFrom::End(0))
        .map_err(|e| BlockError::Open(path.into(), e))?;
    let capacity_sectors = size / SECTOR_SIZE;
    if capacity_sectors == 0 {
        return Err(BlockError::Empty(path.into()));
    }
    if !size.is_multiple_of(SECTOR_SIZE) {
        tracing::warn!("{path}: size is not a multiple of 512; the last partial sector is ignored");
    }
    Ok(capacity_sectors)
}

/// Whether `path` names the file `file` has open (same device and inode).
fn is_same_file(file: &File, path: &str) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(path), file.metadata()) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

fn config_bytes(backing: &Backing) -> Vec<u8> {
    backing.capacity_sectors.to_le_bytes().to_vec()
}

impl Block {
    /// A drive on `backing`; `saved.writeback` offers FLUSH and fdatasyncs on flush requests.
    pub fn new(saved: SavedDrive, backing: Backing, limiter: RateLimiter) -> Block {
        let mut features = VIRTIO_F_VERSION_1;
        if backing.read_only {
            features |= VIRTIO_BLK_F_RO;
        }
        if saved.writeback {
            features |= VIRTIO_BLK_F_FLUSH;
        }
        Block {
            config_space: ConfigSpace::new(config_bytes(&backing)),
            saved,
            backing,
            limiter,
            features,
            queue_sizes: [QUEUE_SIZE],
            active: None,
            stats: Arc::new(BlockStats::default()),
        }
    }

    /// Replaces the backing file (PATCH /drives); the new file keeps the drive's read-only mode.
    /// A path naming the file the drive already has open (Firecracker's Go SDK sends
    /// `path_on_host` with every drive update, rate-limiter changes included) keeps that open,
    /// locked file and re-reads its size: opening it again would find it locked by this drive.
    fn swap_backing(&mut self, path: &str) -> Result<(), DeviceError> {
        if is_same_file(&self.backing.file, path) {
            self.backing.capacity_sectors = capacity(&self.backing.file, path)?;
            self.backing.path = path.to_string();
        } else {
            self.backing = Backing::open(path, self.backing.read_only)?;
        }
        self.config_space.replace(config_bytes(&self.backing));
        self.saved.path = path.to_string();
        Ok(())
    }

    fn serial(&self) -> [u8; ID_BYTES] {
        let mut id = [0u8; ID_BYTES];
        let bytes = self.saved.id.as_bytes();
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
                    total = total.checked_add(len).ok_or(S_IOERR)?;
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
                if self.saved.writeback && !self.backing.read_only {
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
                Ok(u32::try_from(written).unwrap_or(0))
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
            used_len: used.saturating_add(1),
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

    fn config_space(&self) -> Arc<ConfigSpace> {
        self.config_space.clone()
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

    fn saved_config(&self) -> serde_json::Value {
        to_saved(&self.saved)
    }

    fn save_state(&self) -> serde_json::Value {
        to_saved(&BlockState {
            limiter: self.limiter.budget(),
        })
    }

    fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), DeviceError> {
        let state: BlockState = from_saved(KIND.name, state)?;
        self.limiter.set_budget(&state.limiter);
        Ok(())
    }

    fn metrics(&self, out: &mut Vec<Sample>) {
        let s = &self.stats;
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let ops = (
            "flick_block_operations_total",
            "virtio-blk requests completed, by drive and kind.",
        );
        let ops_values = [
            ("read", n(&s.read_ops)),
            ("write", n(&s.write_ops)),
            ("flush", n(&s.flush_ops)),
        ];
        counters(out, ops, "kind", &ops_values);
        let bytes = (
            "flick_block_bytes_total",
            "Bytes read or written by virtio-blk, by drive and direction.",
        );
        let byte_values = [("read", n(&s.read_bytes)), ("write", n(&s.write_bytes))];
        counters(out, bytes, "direction", &byte_values);
        let errors = (
            "flick_block_errors_total",
            "virtio-blk requests refused as malformed or failed on the host, by drive.",
        );
        let error_values = [
            ("invalid_request", n(&s.invalid_requests)),
            ("io_error", n(&s.io_errors)),
        ];
        counters(out, errors, "kind", &error_values);
        counters(
            out,
            THROTTLED,
            "queue",
            &[("requests", self.limiter.throttled)],
        );
    }

    fn update(&mut self, update: &DeviceUpdate) -> Result<bool, DeviceError> {
        let DeviceUpdate::Drive(update) = update else {
            return Err(DeviceError::WrongUpdate(KIND.name));
        };
        if let Some(limits) = &update.rate_limiter {
            self.limiter.update(Some(limits));
            self.saved.limits = SavedLimits::from(Some(limits));
        }
        match &update.path_on_host {
            Some(path) => self.swap_backing(path).map(|()| true),
            None => Ok(false),
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
            .map(|i| (i / SECTOR_SIZE).to_le_bytes()[0])
            .collect();
        std::fs::write(&path, content).unwrap();
        let backing = Backing::open(path.to_str().unwrap(), read_only).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
        let limiter = RateLimiter::new(None).unwrap();
        let saved = SavedDrive {
            id: "disk_0".into(),
            path: path.to_str().unwrap().into(),
            read_only,
            root: false,
            partuuid: None,
            writeback: true,
            limits: SavedLimits::default(),
        };
        (Block::new(saved, backing, limiter), mem, path)
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
    fn data_lengths_whose_sum_overflows_u32_are_refused_before_any_io() {
        let (mut blk, mem, _p) = setup(8, false);
        // A huge capacity so only the length sum can make the request invalid.
        blk.backing.capacity_sectors = u64::MAX / SECTOR_SIZE;
        header(&mem, 0x1000, T_IN, 0);
        let half = 0x8000_0000u32;
        let c = blk.execute(
            &mem,
            &chain(&[
                (0x1000, 16, F_NEXT),
                (0x2000, half, F_NEXT | F_WRITE),
                (0x2000, half, F_NEXT | F_WRITE),
                (0x3000, 1, F_WRITE),
            ]),
        );
        assert_eq!(c.status, Some(S_IOERR));
        assert_eq!(c.used_len, 1);
        assert_eq!(blk.stats.read_ops.load(Ordering::Relaxed), 0);
        assert_eq!(blk.stats.invalid_requests.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn capacity_is_in_config_space() {
        let (blk, _mem, _p) = setup(6, false);
        let mut data = [0u8; 8];
        blk.config_space().read(0, &mut data);
        assert_eq!(u64::from_le_bytes(data), 6);
        let mut beyond = [0xffu8; 4];
        blk.config_space().read(8, &mut beyond);
        assert_eq!(beyond, [0; 4]);
    }

    #[test]
    fn swapping_the_file_updates_capacity_and_saved_path() {
        let (mut blk, _mem, _p) = setup(6, false);
        let (_other, _mem2, other_path) = setup(3, true);
        let update = DeviceUpdate::Drive(crate::control::DriveUpdate {
            drive_id: "disk_0".into(),
            path_on_host: Some(other_path.to_str().unwrap().into()),
            rate_limiter: None,
        });
        // The other drive holds a shared lock: a writable reopen of it is refused.
        assert!(blk.update(&update).is_err());
        let (_third, _mem3, third_path) = setup(3, false);
        drop(_third);
        let update = DeviceUpdate::Drive(crate::control::DriveUpdate {
            drive_id: "disk_0".into(),
            path_on_host: Some(third_path.to_str().unwrap().into()),
            rate_limiter: None,
        });
        assert!(blk.update(&update).unwrap(), "the guest must be told");
        let mut data = [0u8; 8];
        blk.config_space().read(0, &mut data);
        assert_eq!(u64::from_le_bytes(data), 3);
        let saved: SavedDrive = from_saved("block", &blk.saved_config()).unwrap();
        assert_eq!(saved.path, third_path.to_str().unwrap());
    }

    #[test]
    fn block_metrics_keep_one_unit_per_family() {
        let (mut blk, mem, _p) = setup(8, false);
        header(&mem, 0x1000, T_IN, 0);
        blk.execute(
            &mem,
            &chain(&[
                (0x1000, 16, F_NEXT),
                (0x2000, 512, F_NEXT | F_WRITE),
                (0x3000, 1, F_WRITE),
            ]),
        );
        let mut samples = Vec::new();
        blk.metrics(&mut samples);
        let find = |family: &str, label: &str| {
            samples
                .iter()
                .find(|s| s.family == family && s.labels.iter().any(|(_, v)| v == label))
                .map(|s| s.value)
        };
        use crate::metrics::Value::Count;
        assert_eq!(find("flick_block_operations_total", "read"), Some(Count(1)));
        assert_eq!(find("flick_block_bytes_total", "read"), Some(Count(512)));
        assert!(samples
            .iter()
            .any(|s| s.family == "flick_rate_limiter_throttled_total"));
    }

    #[test]
    fn empty_file_is_refused() {
        let path = std::env::temp_dir().join(format!("flick-blk-empty-{}", std::process::id()));
        std::fs::write(&path, b"").unwrap();
        let err = Backing::open(path.to_str().unwrap(), false).unwrap_err();
        assert!(matches!(err, BlockError::Empty(_)));
    }

    #[test]
    fn patch_naming_the_drive_own_writable_file_keeps_it_and_rereads_its_size() {
        let (mut blk, _mem, path) = setup(4, false);
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(6 * SECTOR_SIZE).unwrap();
        let update = DeviceUpdate::Drive(crate::control::DriveUpdate {
            drive_id: "disk_0".into(),
            path_on_host: Some(path.to_str().unwrap().into()),
            rate_limiter: None,
        });
        assert!(blk.update(&update).unwrap(), "the guest must be told");
        let mut data = [0u8; 8];
        blk.config_space().read(0, &mut data);
        assert_eq!(u64::from_le_bytes(data), 6);
        // The drive still holds its exclusive lock.
        let err = Backing::open(path.to_str().unwrap(), false).unwrap_err();
        assert!(matches!(err, BlockError::Locked(_)), "{err}");
    }

    #[test]
    fn second_writable_open_of_the_same_file_is_refused_as_locked() {
        let (_blk, _mem, path) = setup(2, false);
        let err = Backing::open(path.to_str().unwrap(), false).unwrap_err();
        assert!(matches!(err, BlockError::Locked(_)), "{err}");
    }
}
