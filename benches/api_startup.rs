//! API start-up, request latency and VMM memory overhead of the `flick` binary built with the
//! bench (release) profile.
//!
//! `cargo bench --bench api_startup [-- --runs N --requests N]` (extra flick arguments, e.g.
//! `--no-seccomp`: FLICK_BENCH_FLICK_ARGS) prints:
//! - spawn → first successful `GET /` answer over `--api-sock` (connect-retry loop), N runs
//!   (default 30): min / median / p90;
//! - `GET /` and `PUT /machine-config` latency over one keep-alive connection (default 2000 each):
//!   p50 / p99;
//!
//! (percentiles are nearest-rank, see `flick_fixtures::stats`);
//! - memory overhead: with the test guest idling (`tg.exit=halt`) in a 128 MiB VM, the Rss of
//!   every mapping in /proc/PID/smaps except the guest memory mapping (the one sized like guest
//!   RAM), the way Firecracker measures its own overhead.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use flick_fixtures::http::{self, Connection};
use flick_fixtures::stats::percentile;
use flick_fixtures::{kvm_available, test_guest, TempDir};

const FLICK: &str = env!("CARGO_BIN_EXE_flick");
const GUEST_MEM_MIB: u64 = 128;
const READY_TIMEOUT: Duration = Duration::from_secs(5);

struct Args {
    runs: usize,
    requests: usize,
    /// `cargo bench` passes `--bench`; `cargo test --all-targets` runs this binary without it.
    bench: bool,
}

fn parse_args() -> Args {
    let mut args = Args {
        runs: 30,
        requests: 2000,
        bench: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let slot = match arg.as_str() {
            "--runs" => &mut args.runs,
            "--requests" => &mut args.requests,
            "--bench" => {
                args.bench = true;
                continue;
            }
            _ => continue,
        };
        *slot = it
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{arg} needs a number"));
    }
    args
}

/// A flick process, killed when dropped (also when the bench panics).
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(sock: &Path, stdout: Stdio) -> Running {
    let child = Command::new(FLICK)
        .arg("--api-sock")
        .arg(sock)
        .args(flick_fixtures::bench_flick_args())
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(Stdio::inherit())
        .spawn()
        .expect("cannot start flick");
    Running(child)
}

/// Spawns flick and retries `GET /` until it answers 200; returns the time since spawn.
fn time_to_first_answer(sock: &Path) -> Duration {
    let start = Instant::now();
    let child = spawn(sock, Stdio::null());
    let elapsed = loop {
        if let Ok((200, _)) = http::request(sock, "GET", "/", None) {
            break start.elapsed();
        }
        assert!(start.elapsed() < READY_TIMEOUT, "flick never answered");
        thread::sleep(Duration::from_micros(20));
    };
    drop(child);
    let _ = std::fs::remove_file(sock);
    elapsed
}

fn wait_ready(sock: &Path) {
    http::wait_for_socket(sock, READY_TIMEOUT);
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1e3)
}

fn us(d: Duration) -> String {
    format!("{:.1} us", d.as_secs_f64() * 1e6)
}

fn bench_startup(runs: usize) {
    let dir = TempDir::new("bench-startup");
    let sock = dir.path("api.sock");
    time_to_first_answer(&sock); // warm the page cache
    let mut times: Vec<Duration> = (0..runs).map(|_| time_to_first_answer(&sock)).collect();
    times.sort();
    println!(
        "startup (spawn -> first GET / answer), {runs} runs: min {}  median {}  p90 {}",
        ms(times[0]),
        ms(percentile(&times, 0.5)),
        ms(percentile(&times, 0.9))
    );
}

fn bench_requests(requests: usize) {
    let dir = TempDir::new("bench-latency");
    let sock = dir.path("api.sock");
    let child = spawn(&sock, Stdio::null());
    wait_ready(&sock);
    let mut conn = Connection::open(&sock).unwrap();
    let body = r#"{"vcpu_count": 1, "mem_size_mib": 128}"#;
    for (method, path, body, expected) in [
        ("GET", "/", None, 200),
        ("PUT", "/machine-config", Some(body), 204),
    ] {
        let mut times = Vec::with_capacity(requests);
        for _ in 0..requests {
            let start = Instant::now();
            assert_eq!(conn.call(method, path, body).unwrap().0, expected);
            times.push(start.elapsed());
        }
        times.sort();
        println!(
            "{method} {path} over one keep-alive connection, {requests} requests: p50 {}  p99 {}",
            us(percentile(&times, 0.5)),
            us(percentile(&times, 0.99))
        );
    }
    drop(child);
}

/// Rss of one process, split around guest memory (all in KiB).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
struct Rss {
    /// Every mapping except the guest memory mapping.
    other: u64,
    /// The guest memory mapping.
    guest: u64,
    /// How much larger than guest RAM that mapping is: the kernel merges a neighbouring
    /// anonymous mapping into it when their flags match.
    guest_surplus: u64,
}

/// Reads /proc/PID/smaps. The guest memory mapping is the one sized like guest RAM, give or take
/// a merged neighbour of at most 2 MiB.
fn rss_kib(pid: u32) -> Rss {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let guest_kib = GUEST_MEM_MIB * 1024;
    let mut rss = Rss::default();
    let mut size = 0;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        match fields.next() {
            Some("Size:") => size = fields.next().unwrap().parse().unwrap(),
            Some("Rss:") => {
                let kib: u64 = fields.next().unwrap().parse().unwrap();
                if (guest_kib..guest_kib + 2048).contains(&size) {
                    rss.guest += kib;
                    rss.guest_surplus += size - guest_kib;
                } else {
                    rss.other += kib;
                }
            }
            _ => {}
        }
    }
    rss
}

fn bench_memory() {
    if !kvm_available() {
        return; // the [SKIP] line says why
    }
    let guest = test_guest();
    let dir = TempDir::new("bench-memory");
    let sock = dir.path("api.sock");
    let out = dir.path("stdout");
    let child = spawn(&sock, Stdio::from(std::fs::File::create(&out).unwrap()));
    wait_ready(&sock);
    let boot = serde_json::json!({"kernel_image_path": guest, "boot_args": "tg.exit=halt"});
    let machine = format!(r#"{{"vcpu_count": 1, "mem_size_mib": {GUEST_MEM_MIB}}}"#);
    let mut conn = Connection::open(&sock).unwrap();
    for (path, body) in [
        ("/boot-source", boot.to_string()),
        ("/machine-config", machine),
        (
            "/actions",
            r#"{"action_type": "InstanceStart"}"#.to_string(),
        ),
    ] {
        assert_eq!(
            conn.call("PUT", path, Some(&body)).unwrap().0,
            204,
            "PUT {path}"
        );
    }
    let start = Instant::now();
    while !std::fs::read_to_string(&out)
        .unwrap_or_default()
        .contains("testguest: done")
    {
        assert!(start.elapsed() < READY_TIMEOUT, "the guest did not finish");
        thread::sleep(Duration::from_millis(5));
    }
    // Sample for a while, like Firecracker's test does every 10 ms, and keep the largest.
    let mut worst = Rss::default();
    for _ in 0..20 {
        worst = worst.max(rss_kib(child.0.id()));
        thread::sleep(Duration::from_millis(10));
    }
    let upper = worst.other + worst.guest.min(worst.guest_surplus);
    println!(
        "memory overhead (1 vCPU, {GUEST_MEM_MIB} MiB, guest idle): {} KiB ({:.2} MiB) outside \
         guest memory, at most {upper} KiB counting the {} KiB merged into the guest mapping \
         (guest mapping Rss {} KiB)",
        worst.other,
        worst.other as f64 / 1024.0,
        worst.guest_surplus,
        worst.guest
    );
    drop(child);
}

fn main() {
    let args = parse_args();
    if !args.bench {
        println!("api_startup: run it with `cargo bench --bench api_startup`");
        return;
    }
    bench_startup(args.runs);
    bench_requests(args.requests);
    bench_memory();
}
