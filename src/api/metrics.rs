//! The API server's own metrics (a flick extension): requests by endpoint, method and status,
//! request latency as a fixed-bucket histogram, and connection counts. Lock-free atomics written
//! by the connection threads, rendered in Prometheus text format after the VMM's metrics by
//! `GET /metrics`. Imports `api::routes` only.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::routes::Endpoint;
use crate::metrics::{seconds, Kind, Sample, Value};

const METHODS: [&str; 4] = ["GET", "PUT", "PATCH", "other"];
const STATUSES: [u16; 6] = [200, 204, 400, 411, 503, 0];
/// Upper bounds of the latency buckets, in microseconds (`+Inf` follows).
const BUCKETS_US: [u64; 10] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 50_000, 250_000, 1_000_000,
];

const ENDPOINTS: usize = Endpoint::ALL.len();
const COUNTERS: usize = ENDPOINTS * METHODS.len() * STATUSES.len();

/// Counters for one API server.
#[derive(Debug)]
pub struct ApiMetrics {
    requests: [AtomicU64; COUNTERS],
    /// Per bucket, not cumulative; `+Inf` is the last slot.
    latency_buckets: [AtomicU64; BUCKETS_US.len() + 1],
    latency_sum_us: AtomicU64,
    connections: AtomicU64,
    rejected_connections: AtomicU64,
}

impl Default for ApiMetrics {
    fn default() -> Self {
        ApiMetrics::new()
    }
}

fn method_index(method: &str) -> usize {
    METHODS[..3]
        .iter()
        .position(|m| *m == method)
        .unwrap_or(METHODS.len() - 1)
}

fn status_index(status: u16) -> usize {
    STATUSES
        .iter()
        .position(|s| *s == status)
        .unwrap_or(STATUSES.len() - 1)
}

fn endpoint_index(endpoint: Endpoint) -> usize {
    Endpoint::ALL
        .iter()
        .position(|e| *e == endpoint)
        .unwrap_or(ENDPOINTS - 1)
}

impl ApiMetrics {
    pub const fn new() -> ApiMetrics {
        ApiMetrics {
            requests: [const { AtomicU64::new(0) }; COUNTERS],
            latency_buckets: [const { AtomicU64::new(0) }; BUCKETS_US.len() + 1],
            latency_sum_us: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            rejected_connections: AtomicU64::new(0),
        }
    }

    /// Counts one answer to a request that could not be read (no latency: it never started).
    pub fn count(&self, endpoint: Endpoint, method: &str, status: u16) {
        let index = (endpoint_index(endpoint) * METHODS.len() + method_index(method))
            * STATUSES.len()
            + status_index(status);
        self.requests[index].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one answered request and how long it took to answer.
    pub fn record(&self, endpoint: Endpoint, method: &str, status: u16, elapsed: Duration) {
        self.count(endpoint, method, status);
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let bucket = BUCKETS_US
            .iter()
            .position(|bound| us <= *bound)
            .unwrap_or(BUCKETS_US.len());
        self.latency_buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// Counts one accepted connection.
    pub fn connection_opened(&self) {
        self.connections.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one connection turned away because too many were open.
    pub fn connection_rejected(&self) {
        self.rejected_connections.fetch_add(1, Ordering::Relaxed);
    }

    /// The API server's samples.
    pub fn samples(&self, out: &mut Vec<Sample>) {
        const REQUESTS: &str = "flick_api_requests_total";
        const REQUESTS_HELP: &str = "API requests answered.";
        for (e, endpoint) in Endpoint::ALL.iter().enumerate() {
            for (m, method) in METHODS.iter().enumerate() {
                for (s, status) in STATUSES.iter().enumerate() {
                    let index = (e * METHODS.len() + m) * STATUSES.len() + s;
                    let n = self.requests[index].load(Ordering::Relaxed);
                    if n == 0 {
                        continue;
                    }
                    let status = if *status == 0 {
                        "other".to_string()
                    } else {
                        status.to_string()
                    };
                    let labels = vec![
                        ("path", endpoint.as_str().to_string()),
                        ("method", (*method).to_string()),
                        ("status", status),
                    ];
                    out.push(Sample::counter(REQUESTS, REQUESTS_HELP, labels, n));
                }
            }
        }
        const LATENCY: &str = "flick_api_request_duration_seconds";
        const LATENCY_HELP: &str = "Time from a complete request to its answer, ready to send.";
        let part = |suffix, labels, value| Sample {
            family: LATENCY,
            help: LATENCY_HELP,
            kind: Kind::Histogram,
            suffix,
            labels,
            value,
        };
        let mut cumulative = 0;
        for (i, bucket) in self.latency_buckets.iter().enumerate() {
            cumulative += bucket.load(Ordering::Relaxed);
            let le = BUCKETS_US
                .get(i)
                .map_or("+Inf".to_string(), |us| seconds(*us));
            out.push(part("_bucket", vec![("le", le)], Value::Count(cumulative)));
        }
        let sum_us = self.latency_sum_us.load(Ordering::Relaxed);
        out.push(part("_sum", Vec::new(), Value::SecondsFromUs(sum_us)));
        out.push(part("_count", Vec::new(), Value::Count(cumulative)));
        out.push(Sample::counter(
            "flick_api_connections_total",
            "API connections accepted.",
            Vec::new(),
            self.connections.load(Ordering::Relaxed),
        ));
        out.push(Sample::counter(
            "flick_api_connections_rejected_total",
            "API connections refused because too many were open.",
            Vec::new(),
            self.rejected_connections.load(Ordering::Relaxed),
        ));
    }

    /// Appends the metrics in Prometheus text format.
    pub fn render(&self, out: &mut String) {
        let mut samples = Vec::new();
        self.samples(&mut samples);
        crate::metrics::prometheus(&samples, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rendered(metrics: &ApiMetrics) -> String {
        let mut out = String::new();
        metrics.render(&mut out);
        out
    }

    #[test]
    fn requests_are_counted_by_endpoint_method_and_status() {
        let metrics = ApiMetrics::new();
        metrics.record(Endpoint::Drives, "PUT", 204, Duration::from_micros(50));
        metrics.record(Endpoint::Drives, "PUT", 204, Duration::from_micros(50));
        metrics.record(Endpoint::Other, "DELETE", 400, Duration::from_micros(50));
        let text = rendered(&metrics);
        assert!(text.contains(
            "flick_api_requests_total{path=\"/drives/{id}\",method=\"PUT\",status=\"204\"} 2\n"
        ));
        assert!(text.contains(
            "flick_api_requests_total{path=\"other\",method=\"other\",status=\"400\"} 1\n"
        ));
        assert!(!text.contains("path=\"/\""));
    }

    #[test]
    fn latency_histogram_is_cumulative_with_sum_and_count() {
        let metrics = ApiMetrics::new();
        metrics.record(Endpoint::Root, "GET", 200, Duration::from_micros(80));
        metrics.record(Endpoint::Root, "GET", 200, Duration::from_micros(700));
        metrics.record(Endpoint::Root, "GET", 200, Duration::from_secs(3));
        let text = rendered(&metrics);
        assert!(text.contains("flick_api_request_duration_seconds_bucket{le=\"0.000100\"} 1\n"));
        assert!(text.contains("flick_api_request_duration_seconds_bucket{le=\"0.001000\"} 2\n"));
        assert!(text.contains("flick_api_request_duration_seconds_bucket{le=\"1.000000\"} 2\n"));
        assert!(text.contains("flick_api_request_duration_seconds_bucket{le=\"+Inf\"} 3\n"));
        assert!(text.contains("flick_api_request_duration_seconds_sum 3.000780\n"));
        assert!(text.contains("flick_api_request_duration_seconds_count 3\n"));
    }

    #[test]
    fn unread_requests_are_counted_without_latency() {
        let metrics = ApiMetrics::new();
        metrics.count(Endpoint::Other, "other", 411);
        let text = rendered(&metrics);
        assert!(text.contains(
            "flick_api_requests_total{path=\"other\",method=\"other\",status=\"411\"} 1\n"
        ));
        assert!(text.contains("flick_api_request_duration_seconds_count 0\n"));
    }

    #[test]
    fn connections_are_counted() {
        let metrics = ApiMetrics::new();
        metrics.connection_opened();
        metrics.connection_opened();
        metrics.connection_rejected();
        let text = rendered(&metrics);
        assert!(text.contains("flick_api_connections_total 2\n"));
        assert!(text.contains("flick_api_connections_rejected_total 1\n"));
    }
}
