//! Boot benchmark: spawns the release `flick` with a config file N times and reports
//! InstanceStart → guest boot-timer write (from flick's `Guest-boot-time` log line) and whole
//! process spawn → guest ran → exit, plus a phase breakdown of one run.
//!
//! `cargo bench --bench boot` (runs: FLICK_BENCH_RUNS, default 30; memory: FLICK_BENCH_MEM_MIB,
//! default 128; extra guest args: FLICK_BENCH_ARGS).

use std::process::{Command, Stdio};
use std::time::Instant;

const FLICK: &str = env!("CARGO_BIN_EXE_flick");

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let idx = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[idx]
}

fn summary(name: &str, mut values: Vec<f64>) {
    values.sort_by(|a, b| a.total_cmp(b));
    println!(
        "{name:<40} min {:>7.2}  median {:>7.2}  p90 {:>7.2}  (ms, n={})",
        values[0],
        percentile(&values, 0.5),
        percentile(&values, 0.9),
        values.len()
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
    let root = env!("CARGO_MANIFEST_DIR");
    let out = format!("{root}/target/test-guest");
    let status = Command::new("make")
        .args([
            "-s",
            "-C",
            &format!("{root}/resources/guest/test-guest"),
            &format!("OUT={out}"),
        ])
        .status()
        .expect("run make");
    assert!(status.success(), "building the test guest failed");
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
    let dir = std::env::temp_dir().join(format!("flick-bench-boot-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("vm.json");
    let json = serde_json::json!({
        "boot-source": {"kernel_image_path": format!("{out}/testguest.elf"), "boot_args": args},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": mem}
    });
    std::fs::write(&config, json.to_string()).unwrap();

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
    let _ = std::fs::remove_dir_all(&dir);
}
