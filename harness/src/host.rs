//! Facts about the host recorded with every result.

use std::process::Command;

use serde_json::{json, Value};

pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// (busy, total) jiffies of all CPUs from /proc/stat.
fn cpu_jiffies() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = text
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    // idle + iowait
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// Share of CPU time the host spent idle over `window`, in percent.
pub fn idle_pct(window: std::time::Duration) -> f64 {
    let (b0, t0) = cpu_jiffies();
    std::thread::sleep(window);
    let (b1, t1) = cpu_jiffies();
    if t1 <= t0 {
        return f64::NAN;
    }
    100.0 * (1.0 - (b1 - b0) as f64 / (t1 - t0) as f64)
}

/// Waits until the host is at least `want` % idle over a 0.5 s window, for at most `max`;
/// returns the idle share of the last window (what the run started with).
pub fn settle(want: f64, max: std::time::Duration) -> f64 {
    let start = std::time::Instant::now();
    loop {
        let idle = idle_pct(std::time::Duration::from_millis(500));
        if idle >= want || start.elapsed() >= max || crate::measure::interrupted() {
            return idle;
        }
    }
}

pub fn meminfo_kib(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines()
        .find(|l| l.starts_with(key) && l[key.len()..].starts_with(':'))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

pub fn kvm_kind() -> &'static str {
    if !std::path::Path::new("/dev/kvm").exists() {
        "none (/dev/kvm missing)"
    } else if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        "PVM (kvm_pvm: nested, guest kernel code runs in KVM's instruction emulator)"
    } else if std::path::Path::new("/sys/module/kvm_intel").exists() {
        "VT-x (kvm_intel)"
    } else if std::path::Path::new("/sys/module/kvm_amd").exists() {
        "AMD-V (kvm_amd)"
    } else {
        "KVM (unknown kind)"
    }
}

/// First line of `cmd args` (stdout, else stderr), or None if it cannot run.
pub fn version(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).output().ok()?;
    let text = if out.stdout.is_empty() {
        out.stderr
    } else {
        out.stdout
    };
    let text = String::from_utf8_lossy(&text);
    text.lines()
        .find(|l| !l.trim().is_empty())
        .map(|l| l.trim().to_string())
}

pub fn which(cmd: &str) -> Option<String> {
    if cmd.contains('/') {
        return std::path::Path::new(cmd).exists().then(|| cmd.to_string());
    }
    let path = std::env::var("PATH").unwrap_or_else(|_| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    path.split(':')
        .map(|d| format!("{d}/{cmd}"))
        .find(|p| std::path::Path::new(p).is_file())
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn os_name() -> String {
    std::fs::read_to_string("/etc/os-release")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|s| s.trim_matches('"').to_string())
        .unwrap_or_default()
}

/// The repository's commit, when it is a git checkout.
fn commit(repo: &std::path::Path) -> Option<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

pub fn info(flick: &str, repo: &std::path::Path) -> Value {
    json!({
        "os": os_name(),
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "cpu_model": cpu_model(),
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "memory_mib": meminfo_kib("MemTotal").unwrap_or(0) / 1024,
        "kvm": kvm_kind(),
        "versions": {
            "flick": version(flick, &["--version"]),
            "repo_commit": commit(repo),
            "crun": version("crun", &["--version"]),
            "runc": version("runc", &["--version"]),
            "podman": version("podman", &["--version"]),
            "qemu": version("qemu-system-x86_64", &["--version"]),
            "busybox": version("busybox", &[]),
            "unshare": version("unshare", &["--version"]),
        },
    })
}

/// UTC time from the epoch seconds: ("2026-11-25T10:36:48Z", "20261125-103648").
pub fn now_utc() -> (String, String) {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let (hh, mm, ss) = (rem / 3600, rem % 3600 / 60, rem % 60);
    (
        format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}Z"),
        format!("{y:04}{m:02}{d:02}-{hh:02}{mm:02}{ss:02}"),
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_stamp_shape() {
        let (iso, stamp) = super::now_utc();
        assert_eq!(iso.len(), 20);
        assert!(iso.ends_with('Z'));
        assert_eq!(stamp.len(), 15);
    }
}
