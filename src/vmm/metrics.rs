//! The VMM's metric samples: boot time, vCPU exits by reason, the serial console, and every
//! device in the registry (each device describes its own counters). Rendered by
//! [`crate::metrics`] as Prometheus text (`GET /metrics`) or one JSON line (`metrics_path`,
//! written on `FlushMetrics` and periodically).

use std::sync::atomic::Ordering;

use super::builder::RunningVm;
use crate::devices::boot_timer::BootTimes;
use crate::devices::bus::lock;
use crate::metrics::Sample;

/// Gathers every sample.
pub fn collect(vm: Option<&RunningVm>, boot: &BootTimes) -> Vec<Sample> {
    let mut samples = vec![Sample::gauge(
        "flick_boot_time_us",
        "InstanceStart to the guest's boot-timer write (0 until it happens).",
        Vec::new(),
        boot.boot_us.load(Ordering::Relaxed),
    )];
    let Some(vm) = vm else { return samples };
    for (i, s) in vm.vcpus.stats.iter().enumerate() {
        for (reason, c) in [
            ("io_in", &s.io_in),
            ("io_out", &s.io_out),
            ("mmio_read", &s.mmio_read),
            ("mmio_write", &s.mmio_write),
            ("unclaimed", &s.unclaimed),
            ("other", &s.other),
        ] {
            let labels = vec![("vcpu", i.to_string()), ("reason", reason.to_string())];
            samples.push(Sample::counter(
                "flick_vcpu_exits_total",
                "vCPU exits to the VMM by reason.",
                labels,
                c.load(Ordering::Relaxed),
            ));
        }
    }
    samples.push(Sample::counter(
        "flick_serial_lost_bytes_total",
        "Console output bytes that could not be written to the serial output.",
        Vec::new(),
        lock(&vm.legacy.serial).lost_bytes,
    ));
    vm.devices.samples(&mut samples);
    samples
}

/// The count of metrics lines a slow or absent `metrics_path` reader did not take.
pub fn lines_lost(count: u64) -> Sample {
    Sample::counter(
        "flick_metrics_lines_lost_total",
        "Metrics lines not written to metrics_path because nobody was reading it.",
        Vec::new(),
        count,
    )
}
