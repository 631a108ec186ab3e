//! virtio-balloon (the `balloon` device, virtio spec 5.5): the host sets a target size, the
//! guest's driver gives pages to the balloon (inflate queue) and takes them back (deflate queue),
//! and with statistics on, reports its memory counters on the stats queue when the device
//! returns the buffer it holds (every `stats_polling_interval_s`, on a timerfd).
//!
//! Inflated pages are checked against guest memory and returned to the host at once: anonymous
//! private memory with `MADV_DONTNEED`, a snapshot's privately mapped memory file by mapping
//! fresh anonymous memory over the pages (so the file's page cache is no longer held), shared
//! mappings with `MADV_REMOVE`. Deflating needs nothing from the host: the next guest touch of
//! a page faults in a zeroed one. Malformed requests (PFNs outside guest RAM, device-writable or
//! oversized descriptors, arrays outside guest memory) are refused, counted and logged
//! rate-limited. Runs on the VMM thread.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::memory::GuestMemoryMmap;
use serde::{Deserialize, Serialize};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::timerfd::TimerFd;

use super::{
    from_saved, to_saved, ActivateError, Activation, ConfigSpace, DeviceError, DeviceKind,
    DeviceUpdate, Interrupt, NewDevice, Overrides, VirtioDevice, INT_VRING, VIRTIO_F_VERSION_1,
};
use crate::config::{validate_balloon_amount, BalloonConfig, VmConfig};
use crate::metrics::{counters, Sample};

/// virtio device type of a memory balloon.
pub const TYPE_BALLOON: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_BALLOON;
/// The driver reports statistics on a third queue.
pub const F_STATS_VQ: u64 = 1 << 1;
/// The driver may take pages back from the balloon when the guest runs out of memory.
pub const F_DEFLATE_ON_OOM: u64 = 1 << 2;
const QUEUE_SIZE: u16 = 256;
const INFLATE: usize = 0;
const DEFLATE: usize = 1;
const STATS: usize = 2;
/// Balloon page frames are 4 KiB whatever the guest's page size (virtio spec 5.5.6).
const PAGE_SHIFT: u32 = 12;
const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;
const PAGES_PER_MIB: u32 = 256;
/// Longest PFN array taken from one descriptor (16,384 PFNs; Linux sends at most 256).
const MAX_ARRAY_BYTES: u32 = 64 * 1024;
/// Most statistics entries read from one stats buffer.
const MAX_STATS: usize = 64;
/// One statistics entry: le16 tag, le64 value.
const STAT_BYTES: usize = 10;
/// Configuration space: le32 num_pages (device), le32 actual (driver).
const CONFIG_BYTES: usize = 8;
/// The id of the one balloon (Firecracker's API has no id for it).
pub const ID: &str = "balloon";

/// The balloon device kind, for the VMM's device registry.
pub const KIND: DeviceKind = DeviceKind {
    name: "balloon",
    noun: "balloon device",
    id_label: "device",
    open: open_balloon,
    reopen: reopen_balloon,
    describe: describe_balloon,
};

/// Statistics tags (virtio spec 5.5.6.3) with the names of Firecracker's API.
const STAT_NAMES: [(u16, &str); 16] = [
    (0, "swap_in"),
    (1, "swap_out"),
    (2, "major_faults"),
    (3, "minor_faults"),
    (4, "free_memory"),
    (5, "total_memory"),
    (6, "available_memory"),
    (7, "disk_caches"),
    (8, "hugetlb_allocations"),
    (9, "hugetlb_failures"),
    (10, "oom_kill"),
    (11, "alloc_stall"),
    (12, "async_scan"),
    (13, "direct_scan"),
    (14, "async_reclaim"),
    (15, "direct_reclaim"),
];

/// A runtime change of the balloon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BalloonChange {
    /// `PATCH /balloon`: a new target size.
    TargetMib(u32),
    /// `PATCH /balloon/statistics`: a new polling interval.
    StatsIntervalS(u16),
}

/// Why a balloon request was refused.
#[derive(Debug, thiserror::Error)]
pub enum BalloonError {
    #[error("balloon statistics are not enabled (stats_polling_interval_s was 0 at boot)")]
    StatsDisabled,
    #[error("statistics cannot be turned on or off after boot: stats_polling_interval_s was {was}, 0 means off")]
    StatsStateChange { was: u16 },
    #[error("cannot create the statistics timer")]
    Timer(#[source] std::io::Error),
}

impl BalloonError {
    pub fn is_internal(&self) -> bool {
        matches!(self, BalloonError::Timer(_))
    }
}

/// The device's settings as snapshots store them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct SavedBalloon {
    amount_mib: u32,
    deflate_on_oom: bool,
    stats_polling_interval_s: u16,
}

/// What a snapshot keeps of the device beyond its queues.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct BalloonState {
    actual_pages: u32,
    /// The driver's last statistics, by tag.
    stats: BTreeMap<u16, u64>,
    /// The stats buffer the device holds (its chain's head), returned at the next poll.
    stats_head: Option<u16>,
}

fn new_device(saved: SavedBalloon) -> Result<NewDevice, DeviceError> {
    Ok(NewDevice {
        id: ID.into(),
        device: Arc::new(Mutex::new(Balloon::new(saved)?)),
        cmdline: Vec::new(),
    })
}

fn open_balloon(config: &VmConfig, _: Overrides<'_>) -> Result<Vec<NewDevice>, DeviceError> {
    let Some(balloon) = &config.balloon else {
        return Ok(Vec::new());
    };
    validate_balloon_amount(balloon.amount_mib, config.machine_config.mem_size_mib)
        .map_err(|e| DeviceError::from(e).of(KIND.noun, ID))?;
    let saved = SavedBalloon {
        amount_mib: balloon.amount_mib,
        deflate_on_oom: balloon.deflate_on_oom,
        stats_polling_interval_s: balloon.stats_polling_interval_s,
    };
    Ok(vec![new_device(saved).map_err(|e| e.of(KIND.noun, ID))?])
}

fn reopen_balloon(saved: &serde_json::Value, _: Overrides<'_>) -> Result<NewDevice, DeviceError> {
    new_device(from_saved(KIND.name, saved)?).map_err(|e| e.of(KIND.noun, ID))
}

fn describe_balloon(saved: &serde_json::Value, config: &mut VmConfig) -> Result<(), DeviceError> {
    let saved: SavedBalloon = from_saved(KIND.name, saved)?;
    config.balloon = Some(BalloonConfig {
        amount_mib: saved.amount_mib,
        deflate_on_oom: saved.deflate_on_oom,
        stats_polling_interval_s: saved.stats_polling_interval_s,
    });
    Ok(())
}

/// Counters of the device, read by the metrics code.
#[derive(Debug, Default)]
pub struct BalloonStats {
    pub inflated_pages: AtomicU64,
    pub deflated_pages: AtomicU64,
    /// Pages whose release to the host failed (still counted as inflated by the guest).
    pub release_errors: AtomicU64,
    /// PFNs outside guest RAM.
    pub invalid_pfns: AtomicU64,
    /// Descriptors refused: device-writable, oversized, misaligned or outside guest memory.
    pub invalid_descriptors: AtomicU64,
    pub stats_updates: AtomicU64,
}

/// The queues and memory of a running balloon.
struct Active {
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    interrupt: Arc<Interrupt>,
}

/// A virtio-balloon device.
pub struct Balloon {
    saved: SavedBalloon,
    queue_sizes: Vec<u16>,
    config_space: Arc<ConfigSpace>,
    /// Polls the guest for statistics; present when statistics are on.
    timer: Option<TimerFd>,
    active: Option<Active>,
    state: BalloonState,
    pub stats: Arc<BalloonStats>,
}

impl std::fmt::Debug for Balloon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balloon")
            .field("settings", &self.saved)
            .finish_non_exhaustive()
    }
}

/// How one chain of PFN arrays went.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct PfnCounts {
    pages: u64,
    invalid_pfns: u64,
    invalid_descriptors: u64,
}

/// Guest-physical page runs of a PFN stream: consecutive valid pages of one memory region are
/// merged, so each run is released with one call.
struct Runs<'a, F: FnMut(GuestAddress, u64)> {
    mem: &'a GuestMemoryMmap,
    /// (start, pages, region start) of the run being built.
    run: Option<(u64, u64, u64)>,
    on_run: F,
}

impl<F: FnMut(GuestAddress, u64)> Runs<'_, F> {
    /// Adds one PFN; `false` if it is not a page of guest RAM.
    fn push(&mut self, pfn: u32) -> bool {
        let addr = u64::from(pfn) << PAGE_SHIFT;
        let Some((region, offset)) = self.mem.to_region_addr(GuestAddress(addr)) else {
            return false;
        };
        if offset.raw_value() + PAGE_SIZE > region.len() {
            return false;
        }
        let region_start = region.start_addr().raw_value();
        match &mut self.run {
            Some((start, pages, r))
                if *r == region_start && *start + *pages * PAGE_SIZE == addr =>
            {
                *pages += 1;
            }
            _ => {
                self.flush();
                self.run = Some((addr, 1, region_start));
            }
        }
        true
    }

    fn flush(&mut self) {
        if let Some((start, pages, _)) = self.run.take() {
            (self.on_run)(GuestAddress(start), pages);
        }
    }
}

/// Reads the PFN arrays of one chain and hands every run of valid pages to `on_run`.
fn visit_pfns(
    mem: &GuestMemoryMmap,
    descs: &[Descriptor],
    on_run: impl FnMut(GuestAddress, u64),
) -> PfnCounts {
    let mut counts = PfnCounts::default();
    let mut runs = Runs {
        mem,
        run: None,
        on_run,
    };
    let mut buf = [0u8; 1024];
    for d in descs {
        if d.is_write_only() || d.len() > MAX_ARRAY_BYTES || d.len() % 4 != 0 {
            counts.invalid_descriptors += 1;
            continue;
        }
        let len = u64::from(d.len());
        let mut done = 0u64;
        while done < len {
            let n = usize::try_from((len - done).min(buf.len() as u64)).unwrap_or(0);
            let Some(addr) = d.addr().checked_add(done) else {
                counts.invalid_descriptors += 1;
                break;
            };
            if mem.read_slice(&mut buf[..n], addr).is_err() {
                counts.invalid_descriptors += 1;
                break;
            }
            for pfn in buf[..n].chunks_exact(4) {
                let pfn = u32::from_le_bytes([pfn[0], pfn[1], pfn[2], pfn[3]]);
                if runs.push(pfn) {
                    counts.pages += 1;
                } else {
                    counts.invalid_pfns += 1;
                }
            }
            done += n as u64;
        }
    }
    runs.flush();
    counts
}

/// Gives `pages` pages of guest RAM at `addr` back to the host, as the mapping's backing needs.
fn release(mem: &GuestMemoryMmap, addr: GuestAddress, pages: u64) -> std::io::Result<()> {
    let bad = || std::io::Error::from_raw_os_error(libc::EINVAL);
    let (region, offset) = mem.to_region_addr(addr).ok_or_else(bad)?;
    let len = pages.checked_mul(PAGE_SIZE).ok_or_else(bad)?;
    if offset
        .raw_value()
        .checked_add(len)
        .is_none_or(|end| end > region.len())
    {
        return Err(bad());
    }
    let host = region.get_host_address(offset).map_err(|_| bad())?;
    let len = usize::try_from(len).map_err(|_| bad())?;
    // The pages change (to zeros, or back to the snapshot file's contents): the next diff
    // snapshot must write them.
    crate::memory::mark_range(
        region,
        usize::try_from(offset.raw_value()).map_err(|_| bad())?,
        len,
    );
    let flags = region.flags();
    if flags & libc::MAP_SHARED != 0 {
        // SAFETY: `host..host + len` lies inside one mapping that `mem` owns (checked above);
        // MADV_REMOVE frees the backing of those pages, which the guest gave up.
        return match unsafe { libc::madvise(host.cast(), len, libc::MADV_REMOVE) } {
            0 => Ok(()),
            _ => Err(std::io::Error::last_os_error()),
        };
    }
    if region.file_offset().is_some() {
        // A private file mapping (a restored snapshot): fresh anonymous pages over the range
        // drop the copy-on-write copies and the file pages alike. Fall back to MADV_DONTNEED,
        // which drops the copies, if the kernel refuses (e.g. too many mappings).
        let prot = libc::PROT_READ | libc::PROT_WRITE;
        let map_flags =
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE;
        // SAFETY: MAP_FIXED replaces pages inside one mapping that `mem` owns (checked above)
        // with zeroed anonymous memory of the same protection; the guest gave those pages up,
        // and the region's owner unmaps its whole range, which still covers them, on drop.
        let mapped = unsafe { libc::mmap(host.cast(), len, prot, map_flags, -1, 0) };
        if mapped == host.cast() {
            return Ok(());
        }
    }
    // SAFETY: `host..host + len` lies inside one private mapping that `mem` owns (checked
    // above); MADV_DONTNEED only drops those pages, which then read as zeros (or as the file).
    match unsafe { libc::madvise(host.cast(), len, libc::MADV_DONTNEED) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// Parses a stats buffer: entries of le16 tag and le64 value; unknown tags are kept as they are
/// (and left out of the report), a partial trailing entry is ignored.
fn parse_stats(bytes: &[u8]) -> BTreeMap<u16, u64> {
    bytes
        .chunks_exact(STAT_BYTES)
        .take(MAX_STATS)
        .map(|e| {
            let tag = u16::from_le_bytes([e[0], e[1]]);
            let mut value = [0u8; 8];
            value.copy_from_slice(&e[2..10]);
            (tag, u64::from_le_bytes(value))
        })
        .collect()
}

fn config_bytes(num_pages: u32, actual_pages: u32) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(CONFIG_BYTES);
    bytes.extend_from_slice(&num_pages.to_le_bytes());
    bytes.extend_from_slice(&actual_pages.to_le_bytes());
    bytes
}

impl Balloon {
    fn new(saved: SavedBalloon) -> Result<Self, DeviceError> {
        let stats_on = saved.stats_polling_interval_s > 0;
        let timer = if stats_on {
            let timer = TimerFd::new()
                .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
                .map_err(BalloonError::Timer)?;
            Some(timer)
        } else {
            None
        };
        let queues = if stats_on { 3 } else { 2 };
        Ok(Balloon {
            saved,
            queue_sizes: vec![QUEUE_SIZE; queues],
            config_space: ConfigSpace::with_writable(
                config_bytes(saved.amount_mib.saturating_mul(PAGES_PER_MIB), 0),
                4..CONFIG_BYTES,
            ),
            timer,
            active: None,
            state: BalloonState::default(),
            stats: Arc::new(BalloonStats::default()),
        })
    }

    fn target_pages(&self) -> u32 {
        self.saved.amount_mib.saturating_mul(PAGES_PER_MIB)
    }

    /// The `actual` field as the driver last wrote it.
    fn actual_pages(&self) -> u32 {
        let mut bytes = [0u8; 4];
        self.config_space.read(4, &mut bytes);
        u32::from_le_bytes(bytes)
    }

    fn stats_negotiated(&self) -> bool {
        self.active.as_ref().is_some_and(|a| a.queues.len() > STATS)
    }

    /// Starts (or stops, `interval_s` 0) polling for statistics.
    fn arm_timer(&mut self) {
        let interval = Duration::from_secs(u64::from(self.saved.stats_polling_interval_s));
        let negotiated = self.stats_negotiated();
        let Some(timer) = &mut self.timer else { return };
        let armed = if negotiated && !interval.is_zero() {
            timer.reset(interval, Some(interval))
        } else {
            timer.clear()
        };
        if let Err(e) = armed {
            crate::warn_limited!("balloon: cannot set the statistics timer: {e}");
        }
    }

    /// Processes the PFN arrays of every chain on the inflate or deflate queue.
    fn process_pfn_queue(&mut self, index: usize) {
        let Some(active) = &mut self.active else {
            return;
        };
        let Active {
            mem,
            queues,
            interrupt,
        } = active;
        let queue = &mut queues[index];
        let stats = &self.stats;
        let mut completed = false;
        while let Some(chain) = queue.pop_descriptor_chain(&*mem) {
            let head = chain.head_index();
            let descs: Vec<Descriptor> = chain.collect();
            let counts = if index == INFLATE {
                visit_pfns(mem, &descs, |addr, pages| {
                    if let Err(e) = release(mem, addr, pages) {
                        stats.release_errors.fetch_add(pages, Ordering::Relaxed);
                        crate::warn_limited!(
                            "balloon: cannot release {pages} pages at {:#x}: {e}",
                            addr.raw_value()
                        );
                    }
                })
            } else {
                visit_pfns(mem, &descs, |_, _| {})
            };
            let pages = if index == INFLATE {
                &stats.inflated_pages
            } else {
                &stats.deflated_pages
            };
            pages.fetch_add(counts.pages, Ordering::Relaxed);
            if counts.invalid_pfns > 0 || counts.invalid_descriptors > 0 {
                stats
                    .invalid_pfns
                    .fetch_add(counts.invalid_pfns, Ordering::Relaxed);
                stats
                    .invalid_descriptors
                    .fetch_add(counts.invalid_descriptors, Ordering::Relaxed);
                crate::warn_limited!(
                    "balloon: refused {} PFNs outside guest RAM and {} malformed descriptors",
                    counts.invalid_pfns,
                    counts.invalid_descriptors
                );
            }
            if queue.add_used(&*mem, head, 0).is_err() {
                break;
            }
            completed = true;
        }
        if completed && queue.needs_notification(&*mem).unwrap_or(true) {
            interrupt.raise(INT_VRING);
        }
    }

    /// Takes the driver's statistics buffer: reads it and holds it until the next poll.
    fn process_stats_queue(&mut self) {
        if !self.stats_negotiated() {
            return;
        }
        let Some(active) = &mut self.active else {
            return;
        };
        let queue = &mut active.queues[STATS];
        while let Some(chain) = queue.pop_descriptor_chain(&active.mem) {
            let head = chain.head_index();
            let mut bytes = Vec::new();
            let mut valid = true;
            for d in chain {
                let room = MAX_STATS * STAT_BYTES - bytes.len();
                let n = usize::try_from(d.len()).unwrap_or(usize::MAX).min(room);
                let start = bytes.len();
                bytes.resize(start + n, 0);
                if d.is_write_only()
                    || active
                        .mem
                        .read_slice(&mut bytes[start..], d.addr())
                        .is_err()
                {
                    valid = false;
                    break;
                }
            }
            if let Some(previous) = self.state.stats_head.replace(head) {
                // A driver posts one buffer at a time; give back the older one.
                crate::warn_limited!("balloon: a second statistics buffer while one is held");
                let _ = queue.add_used(&active.mem, previous, 0);
            }
            if valid {
                self.state.stats = parse_stats(&bytes);
                self.stats.stats_updates.fetch_add(1, Ordering::Relaxed);
            } else {
                self.stats
                    .invalid_descriptors
                    .fetch_add(1, Ordering::Relaxed);
                crate::warn_limited!("balloon: refused a malformed statistics buffer");
            }
        }
    }

    /// The poll: returns the held statistics buffer, asking the driver for fresh numbers.
    fn request_stats(&mut self) {
        let Some(head) = self.state.stats_head else {
            return;
        };
        if !self.stats_negotiated() {
            return;
        }
        let Some(active) = &mut self.active else {
            return;
        };
        let queue = &mut active.queues[STATS];
        if queue.add_used(&active.mem, head, 0).is_err() {
            return;
        }
        self.state.stats_head = None;
        if queue.needs_notification(&active.mem).unwrap_or(true) {
            active.interrupt.raise(INT_VRING);
        }
    }

    /// `GET /balloon/statistics`: target, actual and the driver's last numbers.
    fn statistics(&self) -> serde_json::Value {
        let target = self.target_pages();
        let actual = self.actual_pages();
        let mut report = serde_json::json!({
            "target_pages": target,
            "actual_pages": actual,
            "target_mib": target / PAGES_PER_MIB,
            "actual_mib": actual / PAGES_PER_MIB,
        });
        for (tag, name) in STAT_NAMES {
            if let Some(value) = self.state.stats.get(&tag) {
                report[name] = serde_json::json!(value);
            }
        }
        report
    }
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        TYPE_BALLOON
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn queues_in_use(&self, acked_features: u64) -> usize {
        if acked_features & F_STATS_VQ != 0 {
            self.queue_sizes.len()
        } else {
            2
        }
    }

    fn features(&self) -> u64 {
        let mut features = VIRTIO_F_VERSION_1;
        if self.saved.stats_polling_interval_s > 0 {
            features |= F_STATS_VQ;
        }
        if self.saved.deflate_on_oom {
            features |= F_DEFLATE_ON_OOM;
        }
        features
    }

    fn config_space(&self) -> Arc<ConfigSpace> {
        self.config_space.clone()
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let expected = self.queues_in_use(activation.acked_features);
        if activation.queues.len() != expected {
            return Err(ActivateError::QueueCount {
                expected,
                found: activation.queues.len(),
            });
        }
        self.active = Some(Active {
            mem: activation.mem,
            queues: activation.queues,
            interrupt: activation.interrupt,
        });
        self.arm_timer();
        // Linux posts its first statistics buffer and notifies before it sets DRIVER_OK; that
        // notification found the device inactive. Look at every queue now.
        for index in 0..expected {
            self.process_queue(index);
        }
        Ok(())
    }

    fn is_active(&self) -> bool {
        self.active.is_some()
    }

    fn reset(&mut self) {
        self.active = None;
        self.state.stats_head = None;
        self.arm_timer();
        // A reset driver holds no pages.
        self.config_space
            .replace(config_bytes(self.target_pages(), 0));
    }

    fn process_queue(&mut self, index: usize) {
        match index {
            INFLATE | DEFLATE => self.process_pfn_queue(index),
            STATS => self.process_stats_queue(),
            _ => {}
        }
    }

    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        self.active
            .iter()
            .flat_map(|a| a.queues.iter().map(Queue::state))
            .collect()
    }

    fn event_fds(&self) -> Vec<(RawFd, EventSet)> {
        self.timer
            .iter()
            .map(|t| (t.as_raw_fd(), EventSet::IN))
            .collect()
    }

    fn process_fd(&mut self, fd: RawFd) {
        let Some(timer) = self.timer.as_mut().filter(|t| t.as_raw_fd() == fd) else {
            return;
        };
        // Non-blocking in effect: the event loop only calls this when the timer expired.
        let _ = timer.wait();
        self.request_stats();
    }

    fn saved_config(&self) -> serde_json::Value {
        to_saved(&self.saved)
    }

    fn save_state(&self) -> serde_json::Value {
        to_saved(&BalloonState {
            actual_pages: self.actual_pages(),
            ..self.state.clone()
        })
    }

    fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), DeviceError> {
        let state: BalloonState = from_saved(KIND.name, state)?;
        self.config_space
            .replace(config_bytes(self.target_pages(), state.actual_pages));
        if self.saved.stats_polling_interval_s == 0 && state.stats_head.is_some() {
            return Err(DeviceError::SavedState(
                KIND.name,
                "a statistics buffer without statistics".into(),
            ));
        }
        self.state = state;
        Ok(())
    }

    fn metrics(&self, out: &mut Vec<Sample>) {
        let s = &self.stats;
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        counters(
            out,
            (
                "flick_balloon_pages_total",
                "4 KiB pages the guest gave to (inflate) or took from (deflate) the balloon.",
            ),
            "direction",
            &[
                ("inflate", n(&s.inflated_pages)),
                ("deflate", n(&s.deflated_pages)),
            ],
        );
        counters(
            out,
            (
                "flick_balloon_errors_total",
                "Balloon requests refused or failed, by kind.",
            ),
            "kind",
            &[
                ("invalid_pfn", n(&s.invalid_pfns)),
                ("invalid_descriptor", n(&s.invalid_descriptors)),
                ("release", n(&s.release_errors)),
            ],
        );
        out.push(Sample::counter(
            "flick_balloon_stats_updates_total",
            "Statistics buffers the guest's driver sent.",
            Vec::new(),
            n(&s.stats_updates),
        ));
        out.push(Sample::gauge(
            "flick_balloon_target_pages",
            "The balloon's target size in 4 KiB pages.",
            Vec::new(),
            u64::from(self.target_pages()),
        ));
        out.push(Sample::gauge(
            "flick_balloon_actual_pages",
            "The balloon's size in 4 KiB pages, as the guest's driver reports it.",
            Vec::new(),
            u64::from(self.actual_pages()),
        ));
    }

    fn update(&mut self, update: &DeviceUpdate) -> Result<bool, DeviceError> {
        match update {
            DeviceUpdate::Balloon(BalloonChange::TargetMib(amount_mib)) => {
                self.saved.amount_mib = *amount_mib;
                self.config_space
                    .replace(config_bytes(self.target_pages(), self.actual_pages()));
                Ok(true)
            }
            DeviceUpdate::Balloon(BalloonChange::StatsIntervalS(interval_s)) => {
                let was = self.saved.stats_polling_interval_s;
                if (was == 0) != (*interval_s == 0) {
                    return Err(BalloonError::StatsStateChange { was }.into());
                }
                self.saved.stats_polling_interval_s = *interval_s;
                self.arm_timer();
                Ok(false)
            }
            _ => Err(DeviceError::WrongUpdate(KIND.name)),
        }
    }

    fn report(&self) -> Result<serde_json::Value, DeviceError> {
        if self.saved.stats_polling_interval_s == 0 {
            return Err(BalloonError::StatsDisabled.into());
        }
        Ok(self.statistics())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;
    const MEM: usize = 4 << 20;
    /// Where the PFN arrays and stats buffers go.
    const ARRAY: u64 = 0x10_0000;
    /// The pages the tests balloon.
    const PAGES: u64 = 0x20_0000;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap()
    }

    fn balloon(stats_s: u16) -> Balloon {
        Balloon::new(SavedBalloon {
            amount_mib: 1,
            deflate_on_oom: false,
            stats_polling_interval_s: stats_s,
        })
        .unwrap()
    }

    /// Three queues at 0, 64 KiB and 128 KiB; the device activated with `features`.
    fn active<'m>(
        mem: &'m GuestMemoryMmap,
        dev: &mut Balloon,
        features: u64,
    ) -> Vec<MockSplitQueue<'m, GuestMemoryMmap>> {
        let n = dev.queues_in_use(features);
        let mocks: Vec<_> = (0..n as u64)
            .map(|i| MockSplitQueue::create(mem, GuestAddress(i * 0x1_0000), 16))
            .collect();
        dev.activate(Activation {
            mem: mem.clone(),
            queues: mocks.iter().map(|m| m.create_queue().unwrap()).collect(),
            acked_features: features,
            interrupt: Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap())),
        })
        .unwrap();
        mocks
    }

    fn used_idx(mem: &GuestMemoryMmap, q: &MockSplitQueue<'_, GuestMemoryMmap>) -> u16 {
        mem.read_obj::<u16>(q.used_addr().unchecked_add(2)).unwrap()
    }

    fn write_pfns(mem: &GuestMemoryMmap, at: u64, pfns: &[u32]) {
        let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
        mem.write_slice(&bytes, GuestAddress(at)).unwrap();
    }

    fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, next))
    }

    #[test]
    fn inflated_pages_are_returned_to_the_host_and_read_as_zero() {
        let mem = mem();
        let mut dev = balloon(0);
        let qs = active(&mem, &mut dev, VIRTIO_F_VERSION_1);
        for page in 0..3u64 {
            mem.write_slice(&[0xaa; 4096], GuestAddress(PAGES + page * PAGE_SIZE))
                .unwrap();
        }
        let first = u32::try_from(PAGES >> PAGE_SHIFT).unwrap();
        write_pfns(&mem, ARRAY, &[first, first + 1, first + 2]);
        qs[INFLATE]
            .add_desc_chains(&[desc(ARRAY, 12, 0, 0)], 0)
            .unwrap();

        dev.process_queue(INFLATE);

        assert_eq!(used_idx(&mem, &qs[INFLATE]), 1);
        let mut page = [0xffu8; 4096];
        mem.read_slice(&mut page, GuestAddress(PAGES + PAGE_SIZE))
            .unwrap();
        assert!(
            page.iter().all(|&b| b == 0),
            "a released page reads as zero"
        );
        assert_eq!(dev.stats.inflated_pages.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn released_pages_of_a_private_file_mapping_read_as_zero_not_as_the_file() {
        use crate::memory::GuestRegionMmap;
        use std::io::Write as _;
        use vm_memory::mmap::MmapRegionBuilder;
        use vm_memory::FileOffset;
        let path = std::env::temp_dir().join(format!("flick-balloon-{}", std::process::id()));
        let mut file = std::fs::File::create(&path).unwrap();
        file.write_all(&[0x5a; 4 * 4096]).unwrap();
        let file = std::fs::OpenOptions::new().read(true).open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let region = MmapRegionBuilder::new(4 * 4096)
            .with_file_offset(FileOffset::new(file, 0))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .unwrap();
        let region = GuestRegionMmap::new(region, GuestAddress(0)).unwrap();
        let mem = GuestMemoryMmap::from_regions(vec![region]).unwrap();
        mem.write_slice(&[0xaa; 4096], GuestAddress(PAGE_SIZE))
            .unwrap();

        release(&mem, GuestAddress(PAGE_SIZE), 2).unwrap();

        let mut page = [0xffu8; 4096];
        for (index, expected) in [(0, 0x5a), (1, 0), (2, 0), (3, 0x5a)] {
            mem.read_slice(&mut page, GuestAddress(index * PAGE_SIZE))
                .unwrap();
            assert!(page.iter().all(|&b| b == expected), "page {index}");
        }
        assert!(release(&mem, GuestAddress(3 * PAGE_SIZE), 2).is_err());
    }

    #[test]
    fn hostile_pfn_arrays_are_refused_and_counted_without_stopping_the_queue() {
        let mem = mem();
        let mut dev = balloon(0);
        let qs = active(&mem, &mut dev, VIRTIO_F_VERSION_1);
        let good = u32::try_from(PAGES >> PAGE_SHIFT).unwrap();
        let beyond = u32::try_from(MEM as u64 >> PAGE_SHIFT).unwrap();
        write_pfns(&mem, ARRAY, &[good, beyond, u32::MAX, good + 1]);
        let chains = [
            // Two PFNs outside guest RAM between two good ones.
            desc(ARRAY, 16, 0, 0),
            // A device-writable array.
            desc(ARRAY, 16, F_WRITE, 0),
            // A huge array.
            desc(ARRAY, 0xffff_fff0, 0, 0),
            // A length that is not a whole number of PFNs.
            desc(ARRAY, 6, 0, 0),
            // An array outside guest memory.
            desc(0xffff_0000, 16, 0, 0),
        ];
        qs[INFLATE].add_desc_chains(&chains, 0).unwrap();

        dev.process_queue(INFLATE);

        assert_eq!(usize::from(used_idx(&mem, &qs[INFLATE])), chains.len());
        let s = &dev.stats;
        assert_eq!(s.inflated_pages.load(Ordering::Relaxed), 2);
        assert_eq!(s.invalid_pfns.load(Ordering::Relaxed), 2);
        assert_eq!(s.invalid_descriptors.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn a_looping_chain_ends_and_its_pfns_are_counted_once_per_visit() {
        let mem = mem();
        let mut dev = balloon(0);
        let qs = active(&mem, &mut dev, VIRTIO_F_VERSION_1);
        let good = u32::try_from(PAGES >> PAGE_SHIFT).unwrap();
        write_pfns(&mem, ARRAY, &[good]);
        // Descriptor 0 links to itself.
        let looped = desc(ARRAY, 4, F_NEXT, 0);
        mem.write_obj(looped, qs[DEFLATE].desc_table_addr())
            .unwrap();
        qs[DEFLATE].avail().ring().ref_at(0).unwrap().store(0u16);
        qs[DEFLATE].avail().idx().store(1u16);

        dev.process_queue(DEFLATE);

        // The chain iterator stops after the queue size (16) descriptors.
        assert_eq!(used_idx(&mem, &qs[DEFLATE]), 1);
        assert!(dev.stats.deflated_pages.load(Ordering::Relaxed) <= 16);
    }

    #[test]
    fn stats_buffers_are_parsed_held_and_returned_on_the_poll() {
        let mem = mem();
        let mut dev = balloon(1);
        let qs = active(&mem, &mut dev, VIRTIO_F_VERSION_1 | F_STATS_VQ);
        let mut buf = Vec::new();
        for (tag, value) in [(4u16, 1000u64), (5, 4096), (99, 7)] {
            buf.extend_from_slice(&tag.to_le_bytes());
            buf.extend_from_slice(&value.to_le_bytes());
        }
        buf.extend_from_slice(&[1, 2, 3]); // a partial entry
        mem.write_slice(&buf, GuestAddress(ARRAY)).unwrap();
        let len = u32::try_from(buf.len()).unwrap();
        qs[STATS]
            .add_desc_chains(&[desc(ARRAY, len, 0, 0)], 0)
            .unwrap();

        dev.process_queue(STATS);

        assert_eq!(used_idx(&mem, &qs[STATS]), 0, "the buffer is held");
        let report = dev.report().unwrap();
        assert_eq!(report["free_memory"], 1000);
        assert_eq!(report["total_memory"], 4096);
        assert_eq!(report["target_mib"], 1);
        assert!(report.get("swap_in").is_none(), "{report}");
        dev.request_stats();
        assert_eq!(used_idx(&mem, &qs[STATS]), 1, "the poll returns it");
    }

    #[test]
    fn a_stats_buffer_posted_before_activation_is_taken_at_activation() {
        let mem = mem();
        let mut dev = balloon(1);
        let stats = MockSplitQueue::create(&mem, GuestAddress(0x2_0000), 16);
        let mut entry = 5u16.to_le_bytes().to_vec();
        entry.extend_from_slice(&4096u64.to_le_bytes());
        mem.write_slice(&entry, GuestAddress(ARRAY)).unwrap();
        stats.add_desc_chains(&[desc(ARRAY, 10, 0, 0)], 0).unwrap();

        let others: Vec<_> = (0..2u64)
            .map(|i| MockSplitQueue::create(&mem, GuestAddress(i * 0x1_0000), 16))
            .collect();
        let mut queues: Vec<Queue> = others.iter().map(|m| m.create_queue().unwrap()).collect();
        queues.push(stats.create_queue().unwrap());
        dev.activate(Activation {
            mem: mem.clone(),
            queues,
            acked_features: VIRTIO_F_VERSION_1 | F_STATS_VQ,
            interrupt: Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap())),
        })
        .unwrap();

        assert_eq!(dev.report().unwrap()["total_memory"], 4096);
        assert_eq!(dev.state.stats_head, Some(0));
    }

    #[test]
    fn stats_are_refused_when_off_and_cannot_be_switched_after_boot() {
        let off = balloon(0);
        assert!(matches!(
            off.report(),
            Err(DeviceError::Balloon(BalloonError::StatsDisabled))
        ));
        let mut on = balloon(5);
        let change = |s| DeviceUpdate::Balloon(BalloonChange::StatsIntervalS(s));
        assert!(on.update(&change(0)).is_err());
        assert!(!on.update(&change(2)).unwrap());
        assert_eq!(on.saved.stats_polling_interval_s, 2);
        assert_eq!(on.features() & F_STATS_VQ, F_STATS_VQ);
        assert_eq!(off.features() & F_STATS_VQ, 0);
    }

    #[test]
    fn target_changes_reach_the_config_space_and_actual_is_driver_writable() {
        let mut dev = balloon(0);
        let changed = dev
            .update(&DeviceUpdate::Balloon(BalloonChange::TargetMib(3)))
            .unwrap();
        assert!(changed);
        let mut num_pages = [0u8; 4];
        dev.config_space().read(0, &mut num_pages);
        assert_eq!(u32::from_le_bytes(num_pages), 3 * 256);
        assert!(!dev.config_space().write(0, &7u32.to_le_bytes()));
        assert!(dev.config_space().write(4, &512u32.to_le_bytes()));
        assert_eq!(dev.actual_pages(), 512);
    }

    #[test]
    fn saved_state_keeps_actual_stats_and_the_held_buffer() {
        let mut dev = balloon(1);
        dev.config_space().write(4, &256u32.to_le_bytes());
        dev.state.stats.insert(4, 42);
        dev.state.stats_head = Some(3);
        let saved = dev.save_state();

        let mut restored = balloon(1);
        restored.restore_state(&saved).unwrap();

        assert_eq!(restored.actual_pages(), 256);
        assert_eq!(restored.state.stats_head, Some(3));
        assert_eq!(restored.statistics()["free_memory"], 42);
        assert!(balloon(0).restore_state(&saved).is_err());
    }

    #[test]
    fn without_the_stats_feature_two_queues_are_used() {
        let dev = balloon(1);
        assert_eq!(dev.queue_max_sizes().len(), 3);
        assert_eq!(dev.queues_in_use(VIRTIO_F_VERSION_1), 2);
        assert_eq!(dev.queues_in_use(VIRTIO_F_VERSION_1 | F_STATS_VQ), 3);
        assert_eq!(balloon(0).queue_max_sizes().len(), 2);
    }
}
