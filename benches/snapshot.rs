//! Snapshot benchmark: restore a test guest from a snapshot N times and report
//! - spawn → first serial byte of the restored guest (`--restore-snapshot --resume`, no API),
//! - `PUT /snapshot/load` with `resume_vm` → reply (the call Firecracker's 9.7 ms figure times),
//!   and → first serial byte after it,
//! - next to a cold boot's spawn → first serial byte of the same guest.
//!
//! `cargo bench --bench snapshot` (runs: FLICK_BENCH_RUNS, default 30).

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use flick_fixtures::stats::stats;
use flick_fixtures::{http, test_guest, TempDir};

const FLICK: &str = env!("CARGO_BIN_EXE_flick");

/// min / median / p90, nearest-rank (see `flick_fixtures::stats`).
fn summary(name: &str, values: Vec<f64>) {
    let s = stats(values).expect("no samples");
    println!(
        "{name:<52} min {:>7.2}  median {:>7.2}  p90 {:>7.2}  (ms, n={})",
        s.min, s.median, s.p90, s.n
    );
}

/// One API call; returns the status code.
fn api(sock: &std::path::Path, method: &str, path: &str, body: &str) -> u16 {
    http::request(sock, method, path, Some(body))
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
        .0
}

fn wait_socket(sock: &std::path::Path) {
    http::wait_for_socket(sock, Duration::from_secs(10));
}

/// Starts flick with `args`, stdin and stderr closed, stdout as given.
fn spawn_flick<I, S>(args: I, stdout: Stdio) -> Child
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    Command::new(FLICK)
        .args(args)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn flick")
}

/// Waits for the first stdout byte of `child` (spawned with stdout piped), kills it, and returns
/// the milliseconds since `start`.
fn first_byte(mut child: Child, start: Instant) -> f64 {
    let mut out = child.stdout.take().unwrap();
    let mut byte = [0u8; 1];
    out.read_exact(&mut byte).expect("no serial output");
    let ms = start.elapsed().as_secs_f64() * 1e3;
    let _ = child.kill();
    let _ = child.wait();
    settle();
    ms
}

/// Lets the kernel finish tearing down the previous VM before the next run, so each run
/// measures a restore on its own rather than one competing with the last VM's teardown.
fn settle() {
    std::thread::sleep(Duration::from_millis(30));
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let kernel = test_guest();
    // `cargo test --all-targets` runs this without `--bench`: a short smoke run then.
    let smoke = !std::env::args().any(|a| a == "--bench");
    let runs: usize = std::env::var("FLICK_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if smoke { 2 } else { 30 });
    let tmp = TempDir::new("bench-snap");
    let dir = &tmp.0;
    let args = "tg.smp=0 tg.quiet=1 tg.count=100000000 tg.exit=halt";

    // Take the snapshot: boot, let it count, pause, snapshot.
    let sock = dir.join("src.sock");
    let mut src = spawn_flick(
        [std::ffi::OsStr::new("--api-sock"), sock.as_os_str()],
        Stdio::null(),
    );
    wait_socket(&sock);
    let boot = serde_json::json!({"kernel_image_path": kernel, "boot_args": args});
    assert_eq!(api(&sock, "PUT", "/boot-source", &boot.to_string()), 204);
    assert_eq!(
        api(
            &sock,
            "PUT",
            "/machine-config",
            r#"{"vcpu_count":1,"mem_size_mib":128}"#
        ),
        204
    );
    assert_eq!(
        api(
            &sock,
            "PUT",
            "/actions",
            r#"{"action_type":"InstanceStart"}"#
        ),
        204
    );
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(api(&sock, "PATCH", "/vm", r#"{"state":"Paused"}"#), 204);
    let state = dir.join("vm.state");
    let mem = dir.join("vm.mem");
    let create = serde_json::json!({"snapshot_path": state, "mem_file_path": mem});
    let t = Instant::now();
    assert_eq!(
        api(&sock, "PUT", "/snapshot/create", &create.to_string()),
        204
    );
    let create_ms = t.elapsed().as_secs_f64() * 1e3;
    let _ = src.kill();
    let _ = src.wait();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "flick snapshot benchmark: {runs} runs, 1 vCPU, 128 MiB test guest, 30 ms between runs"
    );
    println!("host load before: {}", load.trim());
    println!("snapshot create (128 MiB, sparse memory file): {create_ms:.1} ms");

    let restore_cli = || {
        let start = Instant::now();
        let args = [
            "--no-api".as_ref(),
            "--resume".as_ref(),
            "--restore-snapshot".as_ref(),
            state.as_os_str(),
            "--restore-mem".as_ref(),
            mem.as_os_str(),
        ];
        first_byte(
            spawn_flick::<_, &std::ffi::OsStr>(args, Stdio::piped()),
            start,
        )
    };
    let cold = || {
        let cfg = dir.join("cold.json");
        let json = serde_json::json!({"boot-source": {"kernel_image_path": kernel, "boot_args": args},
                                      "machine-config": {"vcpu_count": 1, "mem_size_mib": 128}});
        std::fs::write(&cfg, json.to_string()).unwrap();
        let start = Instant::now();
        let child = spawn_flick(
            [
                "--no-api".as_ref(),
                "--config-file".as_ref(),
                cfg.as_os_str(),
            ],
            Stdio::piped(),
        );
        first_byte(child, start)
    };
    let restore_api = |n: usize| -> (f64, f64) {
        let sock = dir.join(format!("r{n}.sock"));
        let child = spawn_flick(
            [std::ffi::OsStr::new("--api-sock"), sock.as_os_str()],
            Stdio::piped(),
        );
        wait_socket(&sock);
        let body = serde_json::json!({"snapshot_path": state, "resume_vm": true,
                                      "mem_backend": {"backend_type": "File", "backend_path": mem}});
        let start = Instant::now();
        assert_eq!(api(&sock, "PUT", "/snapshot/load", &body.to_string()), 204);
        let call = start.elapsed().as_secs_f64() * 1e3;
        (call, first_byte(child, start))
    };
    for _ in 0..3 {
        restore_cli();
        cold();
    }
    summary(
        "restore (CLI): spawn -> first serial byte",
        (0..runs).map(|_| restore_cli()).collect(),
    );
    let api_runs: Vec<(f64, f64)> = (0..runs).map(restore_api).collect();
    summary(
        "PUT /snapshot/load (resume_vm) -> 204",
        api_runs.iter().map(|r| r.0).collect(),
    );
    summary(
        "PUT /snapshot/load (resume_vm) -> first serial byte",
        api_runs.iter().map(|r| r.1).collect(),
    );
    summary(
        "cold boot: spawn -> first serial byte",
        (0..runs).map(|_| cold()).collect(),
    );
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("host load after: {}", load.trim());
}
