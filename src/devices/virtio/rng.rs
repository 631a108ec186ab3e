//! virtio-rng (the `entropy` device): one request queue whose device-writable buffers are filled
//! from the host's `getrandom`, optionally rate limited (bytes and requests). A chain with no
//! writable buffer, or one outside guest memory, completes with length 0 and is counted.
//! Runs on the VMM thread.

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
use crate::config::{EntropyConfig, VmConfig};
use crate::devices::rate_limiter::{LimiterBudget, RateLimiter, SavedLimits};
use crate::metrics::{counters, Sample, THROTTLED};

/// virtio device type of an entropy source (virtio spec 5.4).
pub const TYPE_RNG: u32 = virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
const QUEUE_SIZE: u16 = 64;
/// Largest request served at once; a larger buffer is filled up to this much.
const MAX_REQUEST: usize = 64 * 1024;
/// The id of the one entropy device (Firecracker's API has no id for it).
const ID: &str = "rng";

/// The entropy device kind, for the VMM's device registry.
pub const KIND: DeviceKind = DeviceKind {
    name: "rng",
    noun: "entropy device",
    id_label: "device",
    open: open_rng,
    reopen: reopen_rng,
    describe: describe_rng,
};

/// The device's settings as snapshots store them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct SavedRng {
    limits: SavedLimits,
}

/// What a snapshot keeps of the device beyond its queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
struct RngState {
    limiter: LimiterBudget,
}

fn new_device(saved: SavedRng) -> Result<NewDevice, DeviceError> {
    let limiter =
        RateLimiter::new(saved.limits.to_config().as_ref()).map_err(DeviceError::Timer)?;
    Ok(NewDevice {
        id: ID.into(),
        device: Arc::new(Mutex::new(Rng::new(saved, limiter))),
        cmdline: Vec::new(),
    })
}

fn open_rng(config: &VmConfig, _: Overrides<'_>) -> Result<Vec<NewDevice>, DeviceError> {
    let Some(entropy) = &config.entropy else {
        return Ok(Vec::new());
    };
    let saved = SavedRng {
        limits: SavedLimits::from(entropy.rate_limiter.as_ref()),
    };
    Ok(vec![new_device(saved).map_err(|e| e.of(KIND.noun, ID))?])
}

fn reopen_rng(saved: &serde_json::Value, _: Overrides<'_>) -> Result<NewDevice, DeviceError> {
    new_device(from_saved(KIND.name, saved)?).map_err(|e| e.of(KIND.noun, ID))
}

fn describe_rng(saved: &serde_json::Value, config: &mut VmConfig) -> Result<(), DeviceError> {
    let saved: SavedRng = from_saved(KIND.name, saved)?;
    config.entropy = Some(EntropyConfig {
        rate_limiter: saved.limits.to_config(),
    });
    Ok(())
}

/// Counters of the device, read by the metrics code.
#[derive(Debug, Default)]
pub struct RngStats {
    pub requests: AtomicU64,
    pub bytes: AtomicU64,
    /// Chains refused: no writable buffer, or buffers outside guest memory.
    pub invalid_requests: AtomicU64,
    /// `getrandom` failures.
    pub host_errors: AtomicU64,
}

/// A virtio-rng device.
pub struct Rng {
    saved: SavedRng,
    limiter: RateLimiter,
    queue_sizes: [u16; 1],
    config_space: Arc<ConfigSpace>,
    active: Option<(GuestMemoryMmap, Queue, Arc<Interrupt>)>,
    buf: Vec<u8>,
    pub stats: Arc<RngStats>,
}

impl std::fmt::Debug for Rng {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rng")
            .field("limits", &self.saved.limits)
            .finish_non_exhaustive()
    }
}

/// Fills `buf` from the host's random source; `false` on failure.
fn fill_random(buf: &mut [u8]) -> bool {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: getrandom writes at most `rest.len()` bytes into the buffer, which we own.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        match usize::try_from(n) {
            Ok(n) if n > 0 => filled += n,
            _ if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted => {}
            _ => return false,
        }
    }
    true
}

/// The device-writable buffers of a chain with their total length (capped at `MAX_REQUEST`);
/// `None` if the chain has a device-readable buffer or no writable one.
fn writable(descs: &[Descriptor]) -> Option<usize> {
    if descs.is_empty() || descs.iter().any(|d| !d.is_write_only()) {
        return None;
    }
    let total: u64 = descs.iter().map(|d| u64::from(d.len())).sum();
    let total = usize::try_from(total)
        .unwrap_or(MAX_REQUEST)
        .min(MAX_REQUEST);
    (total > 0).then_some(total)
}

impl Rng {
    fn new(saved: SavedRng, limiter: RateLimiter) -> Self {
        Rng {
            saved,
            limiter,
            queue_sizes: [QUEUE_SIZE],
            config_space: ConfigSpace::new(Vec::new()),
            active: None,
            buf: vec![0; MAX_REQUEST],
            stats: Arc::new(RngStats::default()),
        }
    }

    /// Fills one chain; returns the used length.
    fn serve(&mut self, mem: &GuestMemoryMmap, descs: &[Descriptor], len: usize) -> u32 {
        if !fill_random(&mut self.buf[..len]) {
            self.stats.host_errors.fetch_add(1, Ordering::Relaxed);
            return 0;
        }
        let mut written = 0usize;
        for d in descs {
            if written == len {
                break;
            }
            let n = usize::try_from(d.len()).unwrap_or(0).min(len - written);
            if mem
                .write_slice(&self.buf[written..written + n], d.addr())
                .is_err()
            {
                self.stats.invalid_requests.fetch_add(1, Ordering::Relaxed);
                return 0;
            }
            written += n;
        }
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        self.stats
            .bytes
            .fetch_add(u64::try_from(written).unwrap_or(0), Ordering::Relaxed);
        u32::try_from(written).unwrap_or(0)
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
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
        let mut queues = activation.queues.into_iter();
        let (Some(queue), None) = (queues.next(), queues.next()) else {
            return Err(ActivateError::QueueCount { expected: 1, found });
        };
        self.active = Some((activation.mem, queue, activation.interrupt));
        Ok(())
    }

    fn is_active(&self) -> bool {
        self.active.is_some()
    }

    fn reset(&mut self) {
        self.active = None;
    }

    fn process_queue(&mut self, _index: usize) {
        let Some((mem, mut queue, interrupt)) = self.active.take() else {
            return;
        };
        let mut completed = false;
        while let Some(chain) = queue.pop_descriptor_chain(&mem) {
            let head = chain.head_index();
            let descs: Vec<Descriptor> = chain.collect();
            let used = match writable(&descs) {
                Some(len) => {
                    let bytes = u64::try_from(len).unwrap_or(u64::MAX);
                    if !self.limiter.consume(bytes) {
                        // Throttled: the limiter's timer resumes this request.
                        queue.go_to_previous_position();
                        break;
                    }
                    self.serve(&mem, &descs, len)
                }
                None => {
                    self.stats.invalid_requests.fetch_add(1, Ordering::Relaxed);
                    0
                }
            };
            if queue.add_used(&mem, head, used).is_err() {
                break;
            }
            completed = true;
        }
        if completed && queue.needs_notification(&mem).unwrap_or(true) {
            interrupt.raise(INT_VRING);
        }
        self.active = Some((mem, queue, interrupt));
    }

    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        self.active.iter().map(|(_, q, _)| q.state()).collect()
    }

    fn event_fds(&self) -> Vec<(RawFd, EventSet)> {
        vec![(self.limiter.timer_fd(), EventSet::IN)]
    }

    fn process_fd(&mut self, fd: RawFd) {
        if fd == self.limiter.timer_fd() {
            self.limiter.timer_fired();
            self.process_queue(0);
        }
    }

    fn saved_config(&self) -> serde_json::Value {
        to_saved(&self.saved)
    }

    fn save_state(&self) -> serde_json::Value {
        to_saved(&RngState {
            limiter: self.limiter.budget(),
        })
    }

    fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), DeviceError> {
        let state: RngState = from_saved(KIND.name, state)?;
        self.limiter.set_budget(&state.limiter);
        Ok(())
    }

    fn metrics(&self, out: &mut Vec<Sample>) {
        let s = &self.stats;
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let requests = (
            "flick_entropy_requests_total",
            "virtio-rng requests, by outcome.",
        );
        let outcomes = [
            ("served", n(&s.requests)),
            ("invalid", n(&s.invalid_requests)),
            ("host_error", n(&s.host_errors)),
        ];
        counters(out, requests, "outcome", &outcomes);
        out.push(Sample::counter(
            "flick_entropy_bytes_total",
            "Random bytes handed to the guest.",
            Vec::new(),
            n(&s.bytes),
        ));
        counters(
            out,
            THROTTLED,
            "queue",
            &[("requests", self.limiter.throttled)],
        );
    }

    fn update(&mut self, _: &DeviceUpdate) -> Result<bool, DeviceError> {
        Err(DeviceError::WrongUpdate(KIND.name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, GuestAddress};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    const F_WRITE: u16 = 2;
    const BUF: u64 = 0x10_0000;

    fn active(mem: &GuestMemoryMmap) -> (Rng, MockSplitQueue<'_, GuestMemoryMmap>) {
        let queue = MockSplitQueue::create(mem, GuestAddress(0), 16);
        let saved = SavedRng {
            limits: SavedLimits::default(),
        };
        let mut rng = Rng::new(saved, RateLimiter::new(None).unwrap());
        rng.activate(Activation {
            mem: mem.clone(),
            queues: vec![queue.create_queue().unwrap()],
            acked_features: VIRTIO_F_VERSION_1,
            interrupt: Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap())),
        })
        .unwrap();
        (rng, queue)
    }

    fn used(mem: &GuestMemoryMmap, q: &MockSplitQueue<'_, GuestMemoryMmap>, i: u64) -> (u16, u32) {
        let idx = mem.read_obj::<u16>(q.used_addr().unchecked_add(2)).unwrap();
        let len = mem
            .read_obj::<u32>(q.used_addr().unchecked_add(4 + 8 * i + 4))
            .unwrap();
        (idx, len)
    }

    #[test]
    fn writable_buffers_are_filled_with_random_bytes() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let (mut rng, q) = active(&mem);
        let desc = RawDescriptor::from(Descriptor::new(BUF, 256, F_WRITE, 0));
        q.add_desc_chains(&[desc], 0).unwrap();
        rng.process_queue(0);
        assert_eq!(used(&mem, &q, 0), (1, 256));
        let mut bytes = [0u8; 256];
        mem.read_slice(&mut bytes, GuestAddress(BUF)).unwrap();
        let mut seen = [false; 256];
        bytes.iter().for_each(|&b| seen[usize::from(b)] = true);
        assert!(
            seen.iter().filter(|&&s| s).count() > 100,
            "256 random bytes take many distinct values"
        );
        assert_eq!(rng.stats.bytes.load(Ordering::Relaxed), 256);
    }

    #[test]
    fn hostile_chains_complete_empty_and_are_counted() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let (mut rng, q) = active(&mem);
        let readable = RawDescriptor::from(Descriptor::new(BUF, 64, 0, 0));
        let outside = RawDescriptor::from(Descriptor::new(0xfff_0000, 64, F_WRITE, 0));
        q.add_desc_chains(&[readable, outside], 0).unwrap();
        rng.process_queue(0);
        assert_eq!(used(&mem, &q, 0).1, 0);
        assert_eq!(used(&mem, &q, 1), (2, 0));
        assert_eq!(rng.stats.invalid_requests.load(Ordering::Relaxed), 2);
    }
}
