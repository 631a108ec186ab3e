//! The boot-timer pseudo-device: a guest writes the byte 123 when it reaches init, and the VMM
//! logs the time since `InstanceStart` (Firecracker's `Guest-boot-time` line).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use super::bus::BusDevice;

/// The value a guest writes to mark "init reached".
pub const MAGIC_VALUE: u8 = 123;

/// The time of `clock` (a CPU-time clock id, or the monotonic clock), in microseconds; 0 if it
/// cannot be read.
fn cpu_clock_us(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec and the clock id is a constant the kernel knows.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    if rc != 0 {
        return 0;
    }
    let positive = |n: libc::c_long| u64::try_from(n).unwrap_or(0);
    positive(ts.tv_sec) * 1_000_000 + positive(ts.tv_nsec) / 1_000
}

/// `CLOCK_MONOTONIC` in microseconds (the clock of Firecracker's `--start-time-us`).
pub fn monotonic_us() -> u64 {
    cpu_clock_us(libc::CLOCK_MONOTONIC)
}

/// CPU time this process has used, in microseconds.
pub fn process_cpu_us() -> u64 {
    cpu_clock_us(libc::CLOCK_PROCESS_CPUTIME_ID)
}

/// CPU time the calling thread has used, in microseconds.
pub fn thread_cpu_us() -> u64 {
    cpu_clock_us(libc::CLOCK_THREAD_CPUTIME_ID)
}

/// Boot-time measurements shared with the VMM (for metrics).
#[derive(Debug, Default)]
pub struct BootTimes {
    /// Wall-clock microseconds from InstanceStart to the first boot-timer write; 0 until then.
    pub boot_us: AtomicU64,
    /// Process CPU microseconds over the same interval.
    pub boot_cpu_us: AtomicU64,
}

/// The device, armed at `InstanceStart`.
#[derive(Debug)]
pub struct BootTimer {
    start: Instant,
    start_cpu_us: u64,
    times: Arc<BootTimes>,
    log: bool,
}

impl BootTimer {
    /// `log`: print the `Guest-boot-time` line (the `--boot-timer` flag).
    pub fn new(start: Instant, start_cpu_us: u64, times: Arc<BootTimes>, log: bool) -> Self {
        BootTimer {
            start,
            start_cpu_us,
            times,
            log,
        }
    }
}

/// Formats Firecracker's boot-time log line.
pub fn boot_time_line(boot_us: u64, cpu_us: u64) -> String {
    format!(
        "Guest-boot-time = {:>6} us {} ms, {:>6} CPU us {} CPU ms",
        boot_us,
        boot_us / 1000,
        cpu_us,
        cpu_us / 1000
    )
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != 0 || data.first() != Some(&MAGIC_VALUE) {
            return;
        }
        let boot_us = u64::try_from(self.start.elapsed().as_micros()).unwrap_or(u64::MAX);
        let cpu_us = process_cpu_us().saturating_sub(self.start_cpu_us);
        if self.times.boot_us.load(Ordering::Relaxed) != 0 {
            return; // only the first write counts
        }
        self.times.boot_us.store(boot_us.max(1), Ordering::Relaxed);
        self.times.boot_cpu_us.store(cpu_us, Ordering::Relaxed);
        if self.log {
            tracing::info!("{}", boot_time_line(boot_us, cpu_us));
        }
        tracing::debug!(
            "boot timer: this vCPU thread used {} CPU us",
            thread_cpu_us()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_matches_firecracker_format() {
        assert_eq!(
            boot_time_line(1234, 567),
            "Guest-boot-time =   1234 us 1 ms,    567 CPU us 0 CPU ms"
        );
    }

    #[test]
    fn magic_write_records_boot_time_once() {
        let times = Arc::new(BootTimes::default());
        let mut timer = BootTimer::new(Instant::now(), process_cpu_us(), times.clone(), false);
        timer.write(0, &[MAGIC_VALUE]);
        let first = times.boot_us.load(Ordering::Relaxed);
        assert!(first > 0);
        std::thread::sleep(std::time::Duration::from_millis(2));
        timer.write(0, &[MAGIC_VALUE]);
        assert_eq!(times.boot_us.load(Ordering::Relaxed), first);
    }

    #[test]
    fn other_values_and_offsets_are_ignored() {
        let times = Arc::new(BootTimes::default());
        let mut timer = BootTimer::new(Instant::now(), 0, times.clone(), false);
        timer.write(0, &[122]);
        timer.write(1, &[MAGIC_VALUE]);
        assert_eq!(times.boot_us.load(Ordering::Relaxed), 0);
    }
}
