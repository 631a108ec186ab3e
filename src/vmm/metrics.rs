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

/// Process start to API socket listening (given `--start-time-us`, and CPU time with
/// `--start-time-cpu-us`).
pub fn startup_time(wall_us: u64, cpu_us: Option<u64>) -> Vec<Sample> {
    let mut out = vec![Sample::gauge(
        "flick_process_startup_time_us",
        "Process start (--start-time-us) to the API socket listening.",
        Vec::new(),
        wall_us,
    )];
    if let Some(cpu_us) = cpu_us {
        out.push(Sample::gauge(
            "flick_process_startup_cpu_time_us",
            "CPU time from process start (--start-time-cpu-us) to the API socket listening.",
            Vec::new(),
            cpu_us,
        ));
    }
    out
}

/// VMM operations whose duration is kept (the last one of each).
#[derive(Debug, Clone, Copy)]
pub enum Latency {
    Pause,
    Resume,
    CreateSnapshot,
    LoadSnapshot,
}

impl Latency {
    const ALL: [Latency; 4] = [
        Latency::Pause,
        Latency::Resume,
        Latency::CreateSnapshot,
        Latency::LoadSnapshot,
    ];

    fn label(self) -> &'static str {
        match self {
            Latency::Pause => "pause_vm",
            Latency::Resume => "resume_vm",
            Latency::CreateSnapshot => "full_create_snapshot",
            Latency::LoadSnapshot => "load_snapshot",
        }
    }
}

/// The duration of the last operation of each [`Latency`] kind, in microseconds.
#[derive(Debug, Default)]
pub struct Latencies([Option<u64>; 4]);

impl Latencies {
    pub fn record(&mut self, op: Latency, started: std::time::Instant) {
        let us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.0[op as usize] = Some(us);
    }

    pub fn samples(&self, out: &mut Vec<Sample>) {
        for op in Latency::ALL {
            if let Some(us) = self.0[op as usize] {
                out.push(Sample::gauge(
                    "flick_operation_duration_us",
                    "How long the VMM took for the last operation of this kind.",
                    vec![("op", op.label().to_string())],
                    us,
                ));
            }
        }
    }
}

/// Console output bytes the serial rate limiter dropped.
pub fn serial_rate_limited(bytes: u64) -> Sample {
    Sample::counter(
        "flick_serial_rate_limited_bytes_total",
        "Console output bytes dropped by the serial rate limiter.",
        Vec::new(),
        bytes,
    )
}

/// Where one flick counter goes in Firecracker's metrics JSON: section and field. Devices are
/// reported twice, as Firecracker does: under their own section (`block_<drive_id>`,
/// `net_<iface_id>`) and summed into the kind's section (`block`, `net`, `entropy`).
struct FcField {
    /// The device kind's section, or the section itself when `per_device` is false.
    section: &'static str,
    field: &'static str,
    per_device: Option<&'static str>,
}

fn fc_field(sample: &Sample) -> Option<FcField> {
    let label = |key: &str| {
        sample
            .labels
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.as_str())
    };
    let device = |section, per_device, field| {
        Some(FcField {
            section,
            field,
            per_device: Some(per_device),
        })
    };
    let plain = |section, field| {
        Some(FcField {
            section,
            field,
            per_device: None,
        })
    };
    match (sample.family, label("kind"), label("direction")) {
        ("flick_block_operations_total", Some("read"), _) => device("block", "drive", "read_count"),
        ("flick_block_operations_total", Some("write"), _) => {
            device("block", "drive", "write_count")
        }
        ("flick_block_operations_total", Some("flush"), _) => {
            device("block", "drive", "flush_count")
        }
        ("flick_block_bytes_total", _, Some("read")) => device("block", "drive", "read_bytes"),
        ("flick_block_bytes_total", _, Some("write")) => device("block", "drive", "write_bytes"),
        ("flick_block_errors_total", Some("invalid_request"), _) => {
            device("block", "drive", "invalid_reqs_count")
        }
        ("flick_block_errors_total", Some("io_error"), _) => {
            device("block", "drive", "execute_fails")
        }
        ("flick_net_frames_total", _, Some("rx")) => device("net", "iface", "rx_packets_count"),
        ("flick_net_frames_total", _, Some("tx")) => device("net", "iface", "tx_packets_count"),
        ("flick_net_bytes_total", _, Some("rx")) => device("net", "iface", "rx_bytes_count"),
        ("flick_net_bytes_total", _, Some("tx")) => device("net", "iface", "tx_bytes_count"),
        ("flick_net_dropped_frames_total", _, Some("rx")) => device("net", "iface", "rx_fails"),
        ("flick_net_dropped_frames_total", _, Some("tx")) => device("net", "iface", "tx_fails"),
        ("flick_net_rx_waits_total", _, _) => device("net", "iface", "no_rx_avail_buffer"),
        ("flick_entropy_requests_total", _, _) => match label("outcome") {
            Some("served") => plain("entropy", "entropy_event_count"),
            Some("host_error") => plain("entropy", "host_rng_fails"),
            _ => None,
        },
        ("flick_entropy_bytes_total", _, _) => plain("entropy", "entropy_bytes"),
        ("flick_rate_limiter_throttled_total", _, _) => {
            match (label("drive"), label("iface"), label("queue")) {
                (Some(_), _, _) => device("block", "drive", "rate_limiter_throttled_events"),
                (_, Some(_), Some("rx")) => device("net", "iface", "rx_rate_limiter_throttled"),
                (_, Some(_), Some("tx")) => device("net", "iface", "tx_rate_limiter_throttled"),
                _ if label("device").is_some() => {
                    plain("entropy", "entropy_rate_limiter_throttled")
                }
                _ => None,
            }
        }
        ("flick_vsock_bytes_total", _, Some("to_guest")) => plain("vsock", "rx_bytes_count"),
        ("flick_vsock_bytes_total", _, Some("to_host")) => plain("vsock", "tx_bytes_count"),
        ("flick_vsock_packets_total", _, Some("to_guest")) => plain("vsock", "rx_packets_count"),
        ("flick_vsock_packets_total", _, Some("from_guest")) => plain("vsock", "tx_packets_count"),
        ("flick_vsock_connections_total", _, _) => match label("event") {
            Some("host_opened" | "guest_opened") => plain("vsock", "conns_added"),
            _ => None,
        },
        ("flick_balloon_stats_updates_total", _, _) => plain("balloon", "stats_updates_count"),
        ("flick_vcpu_exits_total", _, _) => match label("reason") {
            Some("io_in") => plain("vcpu", "exit_io_in"),
            Some("io_out") => plain("vcpu", "exit_io_out"),
            Some("mmio_read") => plain("vcpu", "exit_mmio_read"),
            Some("mmio_write") => plain("vcpu", "exit_mmio_write"),
            _ => None,
        },
        ("flick_serial_lost_bytes_total", _, _) => plain("uart", "missed_write_count"),
        ("flick_serial_rate_limited_bytes_total", _, _) => {
            plain("uart", "rate_limiter_dropped_bytes")
        }
        ("flick_metrics_lines_lost_total", _, _) => plain("logger", "missed_metrics_count"),
        ("flick_process_startup_time_us", _, _) => plain("api_server", "process_startup_time_us"),
        ("flick_process_startup_cpu_time_us", _, _) => {
            plain("api_server", "process_startup_time_cpu_us")
        }
        ("flick_api_requests_total", _, _) => api_field(label("method")?, label("path")?),
        ("flick_operation_duration_us", _, _) => match label("op") {
            Some("pause_vm") => plain("latencies_us", "vmm_pause_vm"),
            Some("resume_vm") => plain("latencies_us", "vmm_resume_vm"),
            Some("full_create_snapshot") => plain("latencies_us", "vmm_full_create_snapshot"),
            Some("load_snapshot") => plain("latencies_us", "vmm_load_snapshot"),
            _ => None,
        },
        _ => None,
    }
}

/// Firecracker's per-endpoint request counters; `_fails` fields are derived from the status.
fn api_field(method: &str, path: &str) -> Option<FcField> {
    let (section, field) = match (method, path) {
        ("GET", "/") => ("get_api_requests", "instance_info_count"),
        ("GET", "/machine-config") => ("get_api_requests", "machine_cfg_count"),
        ("GET", "/version") => ("get_api_requests", "vmm_version_count"),
        ("GET", "/mmds") => ("get_api_requests", "mmds_count"),
        ("PUT", "/mmds") => ("put_api_requests", "mmds_count"),
        ("PATCH", "/mmds") => ("patch_api_requests", "mmds_count"),
        ("PUT", "/actions") => ("put_api_requests", "actions_count"),
        ("PUT", "/boot-source") => ("put_api_requests", "boot_source_count"),
        ("PUT", "/drives/{id}") => ("put_api_requests", "drive_count"),
        ("PUT", "/logger") => ("put_api_requests", "logger_count"),
        ("PUT", "/machine-config") => ("put_api_requests", "machine_cfg_count"),
        ("PUT", "/metrics") => ("put_api_requests", "metrics_count"),
        ("PUT", "/network-interfaces/{id}") => ("put_api_requests", "network_count"),
        ("PUT", "/vsock") => ("put_api_requests", "vsock_count"),
        ("PATCH", "/drives/{id}") => ("patch_api_requests", "drive_count"),
        ("PATCH", "/machine-config") => ("patch_api_requests", "machine_cfg_count"),
        ("PATCH", "/network-interfaces/{id}") => ("patch_api_requests", "network_count"),
        _ => return None,
    };
    Some(FcField {
        section,
        field,
        per_device: None,
    })
}

/// What goes at the top of each Firecracker-style metrics line besides the counters.
#[derive(Debug, Default, Clone)]
pub struct FcHeader {
    pub utc_timestamp_ms: u64,
    /// `emit_id`: the instance id as a top-level `id` field.
    pub id: Option<String>,
    /// Operator-given key-value pairs under a top-level `properties` field.
    pub properties: Option<std::collections::BTreeMap<String, String>>,
}

/// Counter values as of the previous Firecracker-style line: Firecracker writes each counter as
/// the increase since the previous line, and so does flick.
pub type FcPrevious = std::collections::HashMap<(String, &'static str), u64>;

/// One line of metrics in Firecracker's JSON schema (`metrics_path`): each section and field that
/// flick counts, with Firecracker's names; counters as the increase since `previous`. Also
/// returns the values to use as `previous` once this line is written (a lost line's increases
/// go into the next line).
pub fn firecracker_line(
    samples: &[Sample],
    header: &FcHeader,
    previous: &FcPrevious,
) -> (String, FcPrevious) {
    use std::collections::BTreeMap;
    let mut totals: BTreeMap<(String, &'static str), u64> = BTreeMap::new();
    // Gauges (Firecracker's store metrics) are written as they are, not as increases.
    let mut absolute: std::collections::BTreeSet<(String, &'static str)> = Default::default();
    for sample in samples {
        let crate::metrics::Value::Count(value) = sample.value else {
            continue;
        };
        let Some(fc) = fc_field(sample) else {
            continue;
        };
        let mut add = |section: String, field: &'static str| {
            *totals.entry((section, field)).or_default() += value;
        };
        if sample.family == "flick_api_requests_total" {
            let failed = sample
                .labels
                .iter()
                .any(|(k, v)| *k == "status" && !v.starts_with('2'));
            add(fc.section.to_string(), fc.field);
            if let Some(fails) = fails_field(fc.section, fc.field) {
                // Written even when nothing failed (as 0).
                let entry = totals.entry((fc.section.to_string(), fails)).or_default();
                *entry += if failed { value } else { 0 };
            }
            continue;
        }
        if sample.kind == crate::metrics::Kind::Gauge {
            absolute.insert((fc.section.to_string(), fc.field));
        }
        add(fc.section.to_string(), fc.field);
        if let Some(key) = fc.per_device {
            if let Some((_, id)) = sample.labels.iter().find(|(k, _)| *k == key) {
                add(format!("{}_{id}", fc.section), fc.field);
            }
        }
    }
    let mut root = serde_json::Map::new();
    // Firecracker's sections are always there; those flick has no counter for stay empty. A
    // seccomp trap ends flick, so while it writes a line no filter has stopped a call.
    for section in ALWAYS_SECTIONS {
        root.insert(section.into(), serde_json::json!({}));
    }
    root.insert("seccomp".into(), serde_json::json!({"num_faults": 0}));
    root.insert("utc_timestamp_ms".into(), header.utc_timestamp_ms.into());
    if let Some(id) = &header.id {
        root.insert("id".into(), id.clone().into());
    }
    if let Some(properties) = &header.properties {
        let properties = properties
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::from(v.as_str())))
            .collect();
        root.insert("properties".into(), serde_json::Value::Object(properties));
    }
    let mut now = FcPrevious::with_capacity(totals.len());
    for ((section, field), total) in totals {
        let before = if absolute.contains(&(section.clone(), field)) {
            0
        } else {
            previous
                .get(&(section.clone(), field))
                .copied()
                .unwrap_or(0)
        };
        now.insert((section.clone(), field), total);
        let entry = root
            .entry(section)
            .or_insert_with(|| serde_json::Value::Object(serde_json::Map::new()));
        if let serde_json::Value::Object(fields) = entry {
            fields.insert(field.into(), total.saturating_sub(before).into());
        }
    }
    (serde_json::Value::Object(root).to_string(), now)
}

/// Top-level sections of Firecracker's metrics lines that are written whatever the VM has.
const ALWAYS_SECTIONS: [&str; 15] = [
    "api_server",
    "deprecated_api",
    "get_api_requests",
    "i8042",
    "interrupts",
    "latencies_us",
    "logger",
    "mmds",
    "patch_api_requests",
    "put_api_requests",
    "seccomp",
    "signals",
    "uart",
    "vcpu",
    "vmm",
];

/// The `_fails` companion of a PUT or PATCH request counter (GET counters have none).
fn fails_field(section: &str, field: &'static str) -> Option<&'static str> {
    if section == "get_api_requests" {
        return None;
    }
    Some(match field {
        "actions_count" => "actions_fails",
        "boot_source_count" => "boot_source_fails",
        "drive_count" => "drive_fails",
        "logger_count" => "logger_fails",
        "machine_cfg_count" => "machine_cfg_fails",
        "metrics_count" => "metrics_fails",
        "network_count" => "network_fails",
        "vsock_count" => "vsock_fails",
        "mmds_count" => "mmds_fails",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block_reads(drive: &str, n: u64) -> Sample {
        Sample::counter(
            "flick_block_operations_total",
            "",
            vec![("kind", "read".into())],
            n,
        )
        .labelled("drive", drive)
    }

    fn api(method: &str, path: &str, status: &str, n: u64) -> Sample {
        let labels = vec![
            ("path", path.to_string()),
            ("method", method.to_string()),
            ("status", status.to_string()),
        ];
        Sample::counter("flick_api_requests_total", "", labels, n)
    }

    fn parse(line: &str) -> serde_json::Value {
        serde_json::from_str(line).unwrap()
    }

    #[test]
    fn devices_get_their_own_section_and_the_kind_total() {
        let samples = [block_reads("rootfs", 3), block_reads("data", 4)];
        let (line, _) = firecracker_line(&samples, &FcHeader::default(), &FcPrevious::new());
        let v = parse(&line);
        assert_eq!(v["block_rootfs"]["read_count"], 3, "{line}");
        assert_eq!(v["block_data"]["read_count"], 4, "{line}");
        assert_eq!(v["block"]["read_count"], 7, "{line}");
        assert!(v.get("flick_block_operations_total").is_none());
    }

    #[test]
    fn vsock_and_balloon_counters_fill_firecrackers_fields() {
        let c = |family, key, value: &str, n| {
            Sample::counter(family, "", vec![(key, value.to_string())], n)
        };
        let samples = [
            c("flick_vsock_bytes_total", "direction", "to_guest", 10),
            c("flick_vsock_bytes_total", "direction", "to_host", 20),
            c("flick_vsock_packets_total", "direction", "to_guest", 3),
            c("flick_vsock_packets_total", "direction", "from_guest", 4),
            c("flick_vsock_connections_total", "event", "host_opened", 1),
            c("flick_vsock_connections_total", "event", "guest_opened", 2),
            c("flick_vsock_connections_total", "event", "reset", 7),
            Sample::counter("flick_balloon_stats_updates_total", "", Vec::new(), 5),
        ];
        let (line, _) = firecracker_line(&samples, &FcHeader::default(), &FcPrevious::new());
        let v = parse(&line);
        assert_eq!(v["vsock"]["rx_bytes_count"], 10, "{line}");
        assert_eq!(v["vsock"]["tx_bytes_count"], 20, "{line}");
        assert_eq!(v["vsock"]["rx_packets_count"], 3, "{line}");
        assert_eq!(v["vsock"]["tx_packets_count"], 4, "{line}");
        assert_eq!(v["vsock"]["conns_added"], 3, "{line}");
        assert_eq!(v["balloon"]["stats_updates_count"], 5, "{line}");
    }

    #[test]
    fn counters_are_increases_since_the_line_before() {
        let header = FcHeader::default();
        let (_, previous) = firecracker_line(&[block_reads("a", 5)], &header, &FcPrevious::new());
        let (line, previous) = firecracker_line(&[block_reads("a", 8)], &header, &previous);
        assert_eq!(parse(&line)["block_a"]["read_count"], 3, "{line}");
        let (line, _) = firecracker_line(&[block_reads("a", 8)], &header, &previous);
        assert_eq!(parse(&line)["block_a"]["read_count"], 0, "{line}");
    }

    #[test]
    fn api_requests_count_all_and_fails_count_refusals() {
        let samples = [
            api("PUT", "/drives/{id}", "204", 2),
            api("PUT", "/drives/{id}", "400", 1),
            api("GET", "/", "200", 5),
            api("DELETE", "/", "400", 9),
        ];
        let (line, _) = firecracker_line(&samples, &FcHeader::default(), &FcPrevious::new());
        let v = parse(&line);
        assert_eq!(v["put_api_requests"]["drive_count"], 3, "{line}");
        assert_eq!(v["put_api_requests"]["drive_fails"], 1, "{line}");
        assert_eq!(v["get_api_requests"]["instance_info_count"], 5, "{line}");
        assert!(v["get_api_requests"].get("instance_info_fails").is_none());
    }

    #[test]
    fn gauges_are_written_as_they_are() {
        let samples = startup_time(1500, Some(900));
        let (_, previous) = firecracker_line(&samples, &FcHeader::default(), &FcPrevious::new());
        let (line, _) = firecracker_line(&samples, &FcHeader::default(), &previous);
        let v = parse(&line);
        assert_eq!(v["api_server"]["process_startup_time_us"], 1500, "{line}");
        assert_eq!(
            v["api_server"]["process_startup_time_cpu_us"], 900,
            "{line}"
        );
    }

    #[test]
    fn header_carries_id_and_properties_when_asked() {
        let header = FcHeader {
            utc_timestamp_ms: 42,
            id: Some("vm1".into()),
            properties: Some([("k".to_string(), "v".to_string())].into()),
        };
        let (line, _) = firecracker_line(&[], &header, &FcPrevious::new());
        let v = parse(&line);
        assert_eq!(v["utc_timestamp_ms"], 42, "{line}");
        assert_eq!(v["id"], "vm1", "{line}");
        assert_eq!(v["properties"], serde_json::json!({"k": "v"}), "{line}");
        for section in ALWAYS_SECTIONS {
            assert!(v[section].is_object(), "{section} in {line}");
        }
        assert_eq!(v["seccomp"]["num_faults"], 0, "{line}");
    }
}
