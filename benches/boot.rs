//! Boot benchmark: spawns the release `flick` with a config file N times and reports
//! InstanceStart → guest boot-timer write (from flick's `Guest-boot-time` log line) and whole
//! process spawn → guest ran → exit, plus a phase breakdown of one run.
//!
//! `cargo bench --bench boot` (runs: FLICK_BENCH_RUNS, default 30; memory: FLICK_BENCH_MEM_MIB,
//! default 128; extra guest args: FLICK_BENCH_ARGS; extra flick arguments, e.g. `--no-seccomp`:
//! FLICK_BENCH_FLICK_ARGS).

use std::process::{Command, Stdio};
use std::time::Instant;

use flick_fixtures::stats::stats;
use flick_fixtures::{test_guest, TempDir};

const FLICK: &str = env!("CARGO_BIN_EXE_flick");

/// min / median / p90, nearest-rank (see `flick_fixtures::stats`).
fn summary(name: &str, values: Vec<f64>) {
    let s = stats(values).expect("no samples");
    println!(
        "{name:<40} min {:>7.2}  median {:>7.2}  p90 {:>7.2}  (ms, n={})",
        s.min, s.median, s.p90, s.n
    );
}

fn parse_boot_us(stderr: &str) -> Option<f64> {
    let line = stderr.lines().find(|l| l.contains("Guest-boot-time ="))?;
    let after = line.split("Guest-boot-time =").nth(1)?;
    after.split_whitespace().next()?.parse().ok()
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo test --benches` asks for a listing; there is nothing to list.
    }
    let kernel = test_guest();
    // `cargo test --all-targets` runs this without `--bench`: a short smoke run then.
    let smoke = !std::env::args().any(|a| a == "--bench");
    let runs: usize = std::env::var("FLICK_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if smoke { 2 } else { 30 });
    let mem: usize = std::env::var("FLICK_BENCH_MEM_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(128);
    let extra = std::env::var("FLICK_BENCH_ARGS").unwrap_or_default();
    let args = format!("tg.smp=0 tg.quiet=1 {extra}");
    let dir = TempDir::new("bench-boot");
    let json = serde_json::json!({
        "boot-source": {"kernel_image_path": kernel, "boot_args": args},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": mem}
    });
    let config = dir.write("vm.json", json.to_string().as_bytes());

    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("flick boot benchmark: {runs} runs, 1 vCPU, {mem} MiB, guest args {args:?}");
    println!("host load before: {}", load.trim());

    let run = |level: &str| {
        let start = Instant::now();
        let output = Command::new(FLICK)
            .args([
                "--no-api",
                "--boot-timer",
                "--level",
                level,
                "--config-file",
            ])
            .arg(&config)
            .args(flick_fixtures::bench_flick_args())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .expect("spawn flick");
        let elapsed = start.elapsed().as_secs_f64() * 1e3;
        assert!(
            output.status.success(),
            "flick failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        (
            elapsed,
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };

    // Warm the page cache and the binary.
    for _ in 0..3 {
        run("Info");
    }
    let mut boot = Vec::new();
    let mut total = Vec::new();
    for _ in 0..runs {
        let (elapsed, stderr) = run("Info");
        total.push(elapsed);
        boot.push(parse_boot_us(&stderr).expect("no Guest-boot-time line") / 1e3);
    }
    summary("InstanceStart -> boot-timer write", boot);
    summary("spawn -> guest ran -> exit", total);

    let (_, stderr) = run("Debug");
    println!("phase breakdown of one run (debug log):");
    for line in stderr
        .lines()
        .filter(|l| l.contains("build phase:") || l.contains("boot timer:"))
    {
        println!("  {}", line.split("] ").nth(1).unwrap_or(line));
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("host load after: {}", load.trim());
}
