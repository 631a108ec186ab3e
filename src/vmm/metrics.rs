//! VMM metrics: counters gathered from the running VM's vCPUs and devices, rendered in
//! Prometheus text format (`GET /metrics`) or as one JSON line (the `metrics_path` file, written
//! on `FlushMetrics` and periodically).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use super::builder::RunningVm;
use crate::devices::boot_timer::BootTimes;
use crate::devices::bus::lock;

/// One counter family: name, help, kind and its labelled values.
pub struct Family {
    pub name: &'static str,
    pub help: &'static str,
    pub kind: &'static str,
    /// `(labels, value)`; labels as `(key, value)` pairs.
    pub samples: Vec<(Vec<(&'static str, String)>, u64)>,
}

/// Samples `kind=<name>` for each counter, all labelled with `owner`.
fn counters(
    owner: (&'static str, String),
    values: &[(&'static str, &AtomicU64)],
) -> Vec<(Vec<(&'static str, String)>, u64)> {
    values
        .iter()
        .map(|(kind, c)| {
            (
                vec![owner.clone(), ("kind", (*kind).to_string())],
                c.load(Ordering::Relaxed),
            )
        })
        .collect()
}

/// Gathers every metric.
pub fn collect(vm: Option<&RunningVm>, boot: &BootTimes) -> Vec<Family> {
    let mut families = vec![Family {
        name: "flick_boot_time_us",
        help: "InstanceStart to the guest's boot-timer write (0 until it happens).",
        kind: "gauge",
        samples: vec![(Vec::new(), boot.boot_us.load(Ordering::Relaxed))],
    }];
    let Some(vm) = vm else { return families };
    let mut exits = Vec::new();
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
            exits.push((labels, c.load(Ordering::Relaxed)));
        }
    }
    families.push(Family {
        name: "flick_vcpu_exits_total",
        help: "vCPU exits to the VMM by reason.",
        kind: "counter",
        samples: exits,
    });
    let mut block = Vec::new();
    for drive in &vm.devices.drives {
        let stats = lock(&drive.device).stats.clone();
        block.extend(counters(
            ("drive", drive.id.clone()),
            &[
                ("read_ops", &stats.read_ops),
                ("write_ops", &stats.write_ops),
                ("flush_ops", &stats.flush_ops),
                ("read_bytes", &stats.read_bytes),
                ("write_bytes", &stats.write_bytes),
                ("invalid_requests", &stats.invalid_requests),
                ("io_errors", &stats.io_errors),
            ],
        ));
    }
    families.push(Family {
        name: "flick_block_total",
        help: "virtio-blk counters by drive and kind.",
        kind: "counter",
        samples: block,
    });
    let mut net = Vec::new();
    for iface in &vm.devices.nets {
        let stats = lock(&iface.device).stats.clone();
        net.extend(counters(
            ("iface", iface.id.clone()),
            &[
                ("rx_frames", &stats.rx_frames),
                ("rx_bytes", &stats.rx_bytes),
                ("tx_frames", &stats.tx_frames),
                ("tx_bytes", &stats.tx_bytes),
                ("rx_dropped", &stats.rx_dropped),
                ("tx_dropped", &stats.tx_dropped),
                ("rx_waits", &stats.rx_waits),
            ],
        ));
    }
    families.push(Family {
        name: "flick_net_total",
        help: "virtio-net counters by interface and kind.",
        kind: "counter",
        samples: net,
    });
    families
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Prometheus text exposition format.
pub fn prometheus(families: &[Family]) -> String {
    let mut out = String::new();
    for f in families {
        let _ = writeln!(out, "# HELP {} {}", f.name, f.help);
        let _ = writeln!(out, "# TYPE {} {}", f.name, f.kind);
        for (labels, value) in &f.samples {
            let labels: Vec<String> = labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
                .collect();
            if labels.is_empty() {
                let _ = writeln!(out, "{} {value}", f.name);
            } else {
                let _ = writeln!(out, "{}{{{}}} {value}", f.name, labels.join(","));
            }
        }
    }
    out
}

/// One JSON object: `{"utc_timestamp_ms": .., "<family>": [{"labels": {..}, "value": ..}]}`.
pub fn json_line(families: &[Family]) -> String {
    let mut root = serde_json::Map::new();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    root.insert("utc_timestamp_ms".into(), now_ms.into());
    for f in families {
        let samples: Vec<serde_json::Value> = f
            .samples
            .iter()
            .map(|(labels, value)| {
                let labels: serde_json::Map<String, serde_json::Value> = labels
                    .iter()
                    .map(|(k, v)| ((*k).to_string(), v.clone().into()))
                    .collect();
                serde_json::json!({"labels": labels, "value": value})
            })
            .collect();
        root.insert(f.name.into(), samples.into());
    }
    serde_json::Value::Object(root).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Family> {
        vec![Family {
            name: "flick_x_total",
            help: "An example.",
            kind: "counter",
            samples: vec![(vec![("drive", "a\"b".into())], 7), (Vec::new(), 1)],
        }]
    }

    #[test]
    fn prometheus_text_has_help_type_and_escaped_labels() {
        let text = prometheus(&sample());
        assert!(text.contains("# HELP flick_x_total An example.\n"));
        assert!(text.contains("# TYPE flick_x_total counter\n"));
        assert!(text.contains("flick_x_total{drive=\"a\\\"b\"} 7\n"));
        assert!(text.contains("flick_x_total 1\n"));
    }

    #[test]
    fn json_line_is_one_line_of_valid_json() {
        let line = json_line(&sample());
        assert!(!line.contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["flick_x_total"][0]["value"], 7);
        assert_eq!(v["flick_x_total"][0]["labels"]["drive"], "a\"b");
        assert!(v["utc_timestamp_ms"].as_u64().unwrap() > 0);
    }
}
