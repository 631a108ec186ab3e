//! Metric samples and their renderer for Prometheus text exposition (`GET /metrics`); the
//! `metrics_path` file gets Firecracker's JSON schema (`vmm::metrics`). Devices, the VMM and the API server each describe their
//! counters as [`Sample`]s; nothing else formats metrics. Pure data; imports nothing of the crate.

use std::fmt::Write as _;

/// Prometheus metric type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// A sample's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Value {
    Count(u64),
    /// A duration in microseconds, rendered as exact decimal seconds.
    SecondsFromUs(u64),
}

/// One labelled value of a metric family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// Family name, one unit per family (`flick_block_bytes_total`).
    pub family: &'static str,
    pub help: &'static str,
    pub kind: Kind,
    /// Appended to the family name on the sample line (`_bucket`, `_sum`, `_count`), or empty.
    pub suffix: &'static str,
    pub labels: Vec<(&'static str, String)>,
    pub value: Value,
}

impl Sample {
    pub fn counter(
        family: &'static str,
        help: &'static str,
        labels: Vec<(&'static str, String)>,
        value: u64,
    ) -> Self {
        Sample {
            family,
            help,
            kind: Kind::Counter,
            suffix: "",
            labels,
            value: Value::Count(value),
        }
    }

    pub fn gauge(
        family: &'static str,
        help: &'static str,
        labels: Vec<(&'static str, String)>,
        value: u64,
    ) -> Self {
        Sample {
            kind: Kind::Gauge,
            ..Sample::counter(family, help, labels, value)
        }
    }

    /// The same sample with `label` added in front of its labels.
    pub fn labelled(mut self, key: &'static str, value: &str) -> Self {
        self.labels.insert(0, (key, value.to_string()));
        self
    }
}

/// The family every rate-limited device reports its waits in.
pub const THROTTLED: (&str, &str) = (
    "flick_rate_limiter_throttled_total",
    "Times a device stopped to wait for its rate limiter, by device and queue.",
);

/// Pushes one counter sample of `family` per `(label value, count)`, labelled `key`.
pub fn counters(
    out: &mut Vec<Sample>,
    (family, help): (&'static str, &'static str),
    key: &'static str,
    values: &[(&str, u64)],
) {
    for &(label, value) in values {
        out.push(Sample::counter(
            family,
            help,
            vec![(key, label.to_string())],
            value,
        ));
    }
}

/// Microseconds as decimal seconds with six places, exactly.
pub fn seconds(us: u64) -> String {
    format!("{}.{:06}", us / 1_000_000, us % 1_000_000)
}

fn render_value(value: Value) -> String {
    match value {
        Value::Count(n) => n.to_string(),
        Value::SecondsFromUs(us) => seconds(us),
    }
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Prometheus text exposition format: each family's HELP and TYPE once, before its first sample.
pub fn prometheus(samples: &[Sample], out: &mut String) {
    let mut seen: Vec<&str> = Vec::new();
    for (i, s) in samples.iter().enumerate() {
        if seen.contains(&s.family) {
            continue;
        }
        seen.push(s.family);
        let _ = writeln!(out, "# HELP {} {}", s.family, s.help);
        let _ = writeln!(out, "# TYPE {} {}", s.family, s.kind.as_str());
        for member in samples[i..].iter().filter(|m| m.family == s.family) {
            let labels: Vec<String> = member
                .labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
                .collect();
            let value = render_value(member.value);
            if labels.is_empty() {
                let _ = writeln!(out, "{}{} {value}", member.family, member.suffix);
            } else {
                let _ = writeln!(
                    out,
                    "{}{}{{{}}} {value}",
                    member.family,
                    member.suffix,
                    labels.join(",")
                );
            }
        }
    }
}

/// Something outside the VMM that has samples of its own (the API server's request counters),
/// gathered with the VMM's when metrics are written.
pub type Source = std::sync::Arc<dyn Fn(&mut Vec<Sample>) + Send + Sync>;

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Sample> {
        vec![
            Sample::counter(
                "flick_x_total",
                "An example.",
                vec![("drive", "a\"b".into())],
                7,
            ),
            Sample::gauge("flick_y", "Another.", Vec::new(), 3),
            Sample::counter("flick_x_total", "An example.", Vec::new(), 1),
        ]
    }

    #[test]
    fn prometheus_text_has_help_type_once_and_escaped_labels() {
        let mut text = String::new();
        prometheus(&samples(), &mut text);
        assert_eq!(
            text.matches("# HELP flick_x_total An example.\n").count(),
            1
        );
        assert!(text.contains("# TYPE flick_x_total counter\n"));
        assert!(text.contains("# TYPE flick_y gauge\n"));
        assert!(text.contains("flick_x_total{drive=\"a\\\"b\"} 7\n"));
        assert!(text.contains("flick_x_total 1\n"));
        let x = text.find("flick_x_total 1").unwrap();
        assert!(
            x < text.find("# HELP flick_y").unwrap(),
            "a family's samples stay together"
        );
    }

    #[test]
    fn seconds_are_exact_decimals() {
        assert_eq!(seconds(0), "0.000000");
        assert_eq!(seconds(1_500_000), "1.500000");
        assert_eq!(seconds(250), "0.000250");
    }
}
