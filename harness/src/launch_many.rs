//! `launch-many N`: start N flick microVMs at once (test guest in halt mode, so they stay up),
//! wait until every one has logged its `Guest-boot-time`, report time-to-all-ready and memory
//! per VM, then kill them all and remove their files (also on Ctrl-C).

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::host;
use crate::measure::{self, interrupted, parse_boot_time_ms, smaps_rss};
use crate::report::stats;

pub struct Opts {
    pub n: usize,
    pub mem_mib: u64,
    pub api: bool,
    pub flick: String,
    pub guest: PathBuf,
    pub dir: Option<PathBuf>,
    pub keep: bool,
    pub json: Option<PathBuf>,
    pub timeout: Duration,
    /// Clones: snapshot one running VM, then restore N VMs from that one snapshot.
    pub restore: bool,
}

/// The running VMs; dropping it kills and reaps them all and removes the directory.
struct Fleet {
    pids: Vec<i32>,
    dir: PathBuf,
    keep: bool,
    reaped: bool,
}

impl Fleet {
    fn stop(&mut self) -> Duration {
        let t = Instant::now();
        if !self.reaped {
            for &p in &self.pids {
                measure::kill(p);
            }
            for &p in &self.pids {
                let mut st = 0;
                // SAFETY: reaping our own children.
                unsafe { libc::waitpid(p, &mut st, 0) };
            }
            self.reaped = true;
            // Every VM is reaped: the pid list must not be used for killing any more.
            let _ = std::fs::remove_file(self.dir.join("pids"));
        }
        t.elapsed()
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.stop();
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn read_num(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn pids_cgroup_max() -> Option<String> {
    let cg = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    for line in cg.lines() {
        let parts: Vec<&str> = line.splitn(3, ':').collect();
        if parts.len() != 3 {
            continue;
        }
        let file = if parts[1] == "pids" {
            format!("/sys/fs/cgroup/pids{}/pids.max", parts[2])
        } else if parts[1].is_empty() {
            format!("/sys/fs/cgroup{}/pids.max", parts[2])
        } else {
            continue;
        };
        if let Ok(v) = std::fs::read_to_string(&file) {
            return Some(v.trim().to_string());
        }
    }
    None
}

fn threads_now() -> u64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().nth(3).map(String::from))
        .and_then(|rt| rt.split('/').nth(1).and_then(|t| t.parse().ok()))
        .unwrap_or(0)
}

/// Raises RLIMIT_NOFILE's soft limit to the hard limit; returns (soft, hard).
fn raise_nofile() -> (u64, u64) {
    // SAFETY: plain get/setrlimit on our own process.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        if r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        }
        (r.rlim_cur, r.rlim_max)
    }
}

fn mib(kib: f64) -> f64 {
    kib / 1024.0
}

pub fn run(o: &Opts) -> i32 {
    let n = o.n;
    if n == 0 {
        eprintln!("launch-many: N must be at least 1");
        return 2;
    }
    if !o.guest.is_file() {
        eprintln!("launch-many: test guest {} not found (make -C resources/guest/test-guest OUT=$PWD/target/test-guest)", o.guest.display());
        return 1;
    }
    let help = Command::new(&o.flick)
        .arg("--help")
        .output()
        .map(|x| String::from_utf8_lossy(&x.stdout).into_owned())
        .unwrap_or_default();
    if help.is_empty() {
        eprintln!("launch-many: cannot run {}", o.flick);
        return 1;
    }

    // Limits.
    let (nofile, nofile_hard) = raise_nofile();
    let pid_max = read_num("/proc/sys/kernel/pid_max").unwrap_or(0);
    let threads_max = read_num("/proc/sys/kernel/threads-max").unwrap_or(0);
    let threads = threads_now();
    let cg_pids = pids_cgroup_max().unwrap_or_else(|| "n/a".into());
    let avail_kib = host::meminfo_kib("MemAvailable").unwrap_or(0);
    println!(
        "launch-many: {n} microVMs x {} MiB, 1 vCPU, test guest `tg.exit=halt tg.smp=0 tg.quiet=1`",
        o.mem_mib
    );
    println!(
        "limits: open files {nofile} (hard {nofile_hard}), pid_max {pid_max}, threads-max {threads_max} ({threads} threads now), pids cgroup max {cg_pids}, MemAvailable {:.1} GiB",
        avail_kib as f64 / 1048576.0
    );
    // flick uses 3 threads per VM (main, vCPU, one helper); budget 4, and ~4 MiB of host memory (measured here: ~1.5 MiB).
    let need_threads = threads + 4 * n as u64;
    if need_threads > pid_max.min(threads_max) {
        eprintln!("launch-many: {n} VMs need about {need_threads} threads/pids, over pid_max/threads-max; raise kernel.pid_max / kernel.threads-max");
        return 1;
    }
    if let Ok(max) = cg_pids.parse::<u64>() {
        if 4 * n as u64 > max {
            eprintln!(
                "launch-many: the pids cgroup allows {max} tasks, {n} VMs need about {}",
                4 * n
            );
            return 1;
        }
    }
    if avail_kib < 4 * 1024 * n as u64 {
        eprintln!(
            "launch-many: MemAvailable {} MiB is below the ~4 MiB per VM this needs (measured: ~1.5 MiB with the halted test guest)",
            avail_kib / 1024
        );
        return 1;
    }

    let dir = match &o.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("flick-launch-many.{}", std::process::id())),
    };
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("launch-many: cannot create {}: {e}", dir.display());
        return 1;
    }
    let mut fleet = Fleet {
        pids: Vec::with_capacity(n),
        dir: dir.clone(),
        keep: o.keep,
        reaped: false,
    };

    // API mode only when this flick serves its API; probe with one VM first.
    let mut api = o.api;
    let mut api_note = String::from("off");
    if api {
        if !help.contains("--api-sock") {
            api = false;
            api_note = "requested, but this flick has no --api-sock: started with --no-api".into();
        } else if let Err(e) = probe_api(&o.flick, &o.guest, &dir) {
            api = false;
            api_note = format!("requested, but API mode failed ({e}): started with --no-api");
        } else {
            api_note = "on (one --api-sock per VM)".into();
        }
    }
    println!("API: {api_note}");

    let boot_args = "tg.exit=halt tg.smp=0 tg.quiet=1";
    // Clones: one snapshot of a halted test guest (so that, like the booted VMs, the clones idle
    // in `hlt`; that restored guests run on is what tests/snapshot.rs checks).
    let clone_files = if o.restore {
        match make_snapshot(&o.flick, &o.guest, &dir, o.mem_mib) {
            Ok(files) => {
                let size = std::fs::metadata(&files.1).map(|m| m.len()).unwrap_or(0);
                println!(
                    "clones: restored with --restore-snapshot/--resume from one snapshot of a halted test guest (memory file {:.1} MiB, mapped MAP_PRIVATE by every clone)",
                    size as f64 / 1048576.0
                );
                Some(files)
            }
            Err(e) => {
                eprintln!("launch-many: making the snapshot failed: {e}");
                return 1;
            }
        }
    } else {
        None
    };
    for i in 0..n {
        let cfg = json!({
            "boot-source": {"kernel_image_path": o.guest, "boot_args": boot_args},
            "machine-config": {"vcpu_count": 1, "mem_size_mib": o.mem_mib},
        });
        if std::fs::write(dir.join(format!("vm{i}.json")), cfg.to_string()).is_err()
            || std::fs::write(dir.join(format!("vm{i}.log")), b"").is_err()
        {
            eprintln!("launch-many: cannot write into {}", dir.display());
            return 1;
        }
    }
    let mut pidfile = std::fs::File::create(dir.join("pids")).ok();
    let load_before = host::loadavg();
    let avail_before = host::meminfo_kib("MemAvailable").unwrap_or(0);

    // Start them all, with a watcher thread that notes when each log gets its boot-timer line.
    let stop = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let watcher = {
        let (dir, stop) = (dir.clone(), stop.clone());
        let parse = if o.restore {
            parse_restore_ms
        } else {
            parse_boot_time_ms
        };
        std::thread::spawn(move || watch(&dir, n, &stop, parse))
    };
    let mut spawn_at: Vec<Instant> = Vec::with_capacity(n);
    for i in 0..n {
        if interrupted() {
            eprintln!("launch-many: interrupted, cleaning up");
            stop.store(true, Ordering::SeqCst);
            return 130;
        }
        let mut cmd = Command::new(&o.flick);
        cmd.arg("--id").arg(format!("vm{i}"));
        if api {
            cmd.arg("--api-sock").arg(dir.join(format!("vm{i}.sock")));
        } else {
            cmd.arg("--no-api");
        }
        match &clone_files {
            Some((state, mem)) => {
                cmd.arg("--restore-snapshot")
                    .arg(state)
                    .arg("--restore-mem")
                    .arg(mem)
                    .arg("--resume");
            }
            None => {
                cmd.arg("--config-file")
                    .arg(dir.join(format!("vm{i}.json")))
                    .arg("--boot-timer");
            }
        }
        cmd.args(["--level", "Info", "--log-path"])
            .arg(dir.join(format!("vm{i}.log")))
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        match std::fs::File::create(dir.join(format!("vm{i}.err"))) {
            Ok(f) => cmd.stderr(f),
            Err(_) => cmd.stderr(Stdio::null()),
        };
        // SAFETY: prctl is async-signal-safe; the VMs die with the harness.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        spawn_at.push(Instant::now());
        match cmd.spawn() {
            Ok(c) => {
                let pid = c.id() as i32;
                fleet.pids.push(pid);
                if let Some(f) = pidfile.as_mut() {
                    let _ = writeln!(f, "{pid}");
                }
            }
            Err(e) => {
                eprintln!("launch-many: starting VM {i} failed: {e}");
                stop.store(true, Ordering::SeqCst);
                return 1;
            }
        }
    }
    let spawned = t0.elapsed();

    // Wait for the watcher; meanwhile no VM may exit (halted guests keep running).
    let mut ticks = 0u64;
    while !watcher.is_finished() {
        std::thread::sleep(Duration::from_millis(10));
        ticks += 1;
        let fail = if interrupted() {
            eprintln!("launch-many: interrupted, cleaning up");
            Some(130)
        } else if t0.elapsed() > o.timeout {
            eprintln!("launch-many: not all {n} VMs up after {:?}", o.timeout);
            Some(1)
        } else if ticks.is_multiple_of(10) {
            fleet
                .pids
                .iter()
                .position(|&p| measure::exited_nowait(p))
                .map(|i| {
                    let err =
                        std::fs::read_to_string(dir.join(format!("vm{i}.err"))).unwrap_or_default();
                    let log =
                        std::fs::read_to_string(dir.join(format!("vm{i}.log"))).unwrap_or_default();
                    eprintln!("launch-many: VM {i} exited: {} {}", err.trim(), log.trim());
                    1
                })
        } else {
            None
        };
        if let Some(code) = fail {
            stop.store(true, Ordering::SeqCst);
            let _ = watcher.join();
            return code;
        }
    }
    let (ready_at, boot_opt) = watcher.join().unwrap_or_default();
    let up = ready_at.iter().filter(|r| r.is_some()).count();
    if up < n {
        eprintln!("launch-many: only {up} of {n} VMs up");
        return 1;
    }
    let ready: Vec<Option<Duration>> = ready_at.iter().map(|r| r.map(|t| t - t0)).collect();
    let boot_ms: Vec<f64> = boot_opt.iter().flatten().copied().collect();
    let own: Vec<f64> = ready_at
        .iter()
        .zip(&spawn_at)
        .filter_map(|(r, s)| r.map(|r| (r - *s).as_secs_f64() * 1e3))
        .collect();
    let all_ready = ready.iter().flatten().max().copied().unwrap_or_default();
    let up_means = if o.restore {
        "\"snapshot loaded\" in every log: restored and resumed"
    } else {
        "Guest-boot-time in every log"
    };
    println!(
        "all {n} up ({up_means}) {:.1} ms after the first spawn; spawning took {:.1} ms",
        all_ready.as_secs_f64() * 1e3,
        spawned.as_secs_f64() * 1e3
    );
    let ready_ms = stats(own);
    let boot = stats(boot_ms.clone());
    let phase = if o.restore {
        "snapshot load (flick's own log)"
    } else {
        "InstanceStart -> boot timer"
    };
    if let (Some(r), Some(b)) = (ready_ms, boot) {
        println!(
            "  per VM, its own spawn -> up: median {:.1} ms, p90 {:.1} ms, max {:.1} ms; {phase}: median {:.2} ms, p90 {:.2} ms, max {:.2} ms",
            r.median, r.p90, r.max, b.median, b.p90, b.max
        );
    }

    // API check: GET / on every socket.
    let mut api_json = serde_json::Value::Null;
    if api {
        let t = Instant::now();
        let ok = (0..n)
            .filter(|i| {
                matches!(
                    flick_fixtures::http::request(
                        &dir.join(format!("vm{i}.sock")),
                        "GET",
                        "/",
                        None
                    ),
                    Ok((200, _))
                )
            })
            .count();
        println!(
            "  API: GET / answered 200 on {ok} of {n} sockets ({:.1} ms for all)",
            t.elapsed().as_secs_f64() * 1e3
        );
        api_json = json!({"get_root_ok": ok, "ms": t.elapsed().as_secs_f64() * 1e3});
    }

    // Memory.
    let guest_kib = o.mem_mib * 1024;
    let (mut rss, mut over, mut pss, mut counted) = (0u64, 0u64, 0u64, 0usize);
    let mut private = 0u64;
    for &p in &fleet.pids {
        if let Some((t, ov, ps, _)) = smaps_rss(p, guest_kib) {
            rss += t;
            over += ov;
            pss += ps;
            counted += 1;
            private += measure::smaps_private_kib(p).unwrap_or(0);
        }
    }
    let avail_after = host::meminfo_kib("MemAvailable").unwrap_or(0);
    let nn = counted.max(1) as f64;
    let host_per_vm = (avail_before.saturating_sub(avail_after)) as f64 / n as f64;
    println!(
        "memory per VM ({counted} processes): Rss {:.2} MiB (sum / N), Pss {:.2} MiB, VMM overhead {:.2} MiB (Rss of mappings not sized like guest RAM), guest RAM resident {:.2} MiB; host MemAvailable drop / N: {:.2} MiB",
        mib(rss as f64 / nn),
        mib(pss as f64 / nn),
        mib(over as f64 / nn),
        mib((rss - over) as f64 / nn),
        mib(host_per_vm)
    );
    println!(
        "  private memory per VM (Private_Clean + Private_Dirty of every mapping: VMM and the guest pages it wrote): {:.2} MiB",
        mib(private as f64 / nn)
    );
    let load_after = host::loadavg();
    let stop = fleet.stop();
    println!(
        "load: {load_before} -> {load_after}; killed and reaped all {n} in {:.1} ms",
        stop.as_secs_f64() * 1e3
    );

    if let Some(path) = &o.json {
        let j = json!({
            "n": n,
            "mem_mib": o.mem_mib,
            "api": api_note,
            "spawn_all_ms": spawned.as_secs_f64() * 1e3,
            "all_ready_ms": all_ready.as_secs_f64() * 1e3,
            "own_spawn_to_up_ms": ready_ms.map(|s| json!({"median": s.median, "p90": s.p90, "max": s.max})),
            "boot_timer_ms": boot.map(|s| json!({"median": s.median, "p90": s.p90, "max": s.max})),
            "api_check": api_json,
            "per_vm_mib": {
                "rss": mib(rss as f64 / nn),
                "pss": mib(pss as f64 / nn),
                "vmm_overhead_rss": mib(over as f64 / nn),
                "guest_ram_rss": mib((rss - over) as f64 / nn),
                "host_memavailable_drop": mib(host_per_vm),
                "private": mib(private as f64 / nn),
            },
            "restore": o.restore,
            "limits": {"nofile": nofile, "pid_max": pid_max, "threads_max": threads_max, "pids_cgroup_max": cg_pids},
            "load_before": load_before,
            "load_after": load_after,
            "kill_all_ms": stop.as_secs_f64() * 1e3,
        });
        if let Err(e) = std::fs::write(path, serde_json::to_string_pretty(&j).unwrap()) {
            eprintln!("launch-many: cannot write {}: {e}", path.display());
        }
    }
    0
}

/// flick's `snapshot loaded in N us` log line, in milliseconds.
fn parse_restore_ms(log: &str) -> Option<f64> {
    let rest = log.split("snapshot loaded in ").nth(1)?;
    let us: f64 = rest.split_whitespace().next()?.parse().ok()?;
    Some(us / 1e3)
}

/// Boots one test guest with the API, lets it reach `hlt`, pauses it and snapshots it into
/// `dir`; returns the state and memory files.
fn make_snapshot(
    flick: &str,
    guest: &Path,
    dir: &Path,
    mem_mib: u64,
) -> Result<(PathBuf, PathBuf), String> {
    let cfg = dir.join("source.json");
    let sock = dir.join("source.sock");
    let out = dir.join("source.out");
    std::fs::write(
        &cfg,
        json!({
            "boot-source": {"kernel_image_path": guest,
                            "boot_args": "tg.exit=halt tg.smp=0 tg.quiet=1"},
            "machine-config": {"vcpu_count": 1, "mem_size_mib": mem_mib},
        })
        .to_string(),
    )
    .map_err(|e| e.to_string())?;
    let mut child = Command::new(flick)
        .arg("--api-sock")
        .arg(&sock)
        .arg("--config-file")
        .arg(&cfg)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).map_err(|e| e.to_string())?)
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let result = (|| {
        let t0 = Instant::now();
        while !std::fs::read_to_string(&out).is_ok_and(|t| t.contains("testguest: done")) {
            if t0.elapsed() > Duration::from_secs(10) {
                return Err("the source guest did not finish booting within 10 s".to_string());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let call = |method, path, body: serde_json::Value| match flick_fixtures::http::request(
            &sock,
            method,
            path,
            Some(&body.to_string()),
        ) {
            Ok((204, _)) => Ok(()),
            Ok((status, answer)) => Err(format!("{method} {path}: {status} {answer}")),
            Err(e) => Err(format!("{method} {path}: {e}")),
        };
        call("PATCH", "/vm", json!({"state": "Paused"}))?;
        let (state, mem) = (dir.join("clone.state"), dir.join("clone.mem"));
        call(
            "PUT",
            "/snapshot/create",
            json!({"snapshot_path": state, "mem_file_path": mem}),
        )?;
        Ok((state, mem))
    })();
    let _ = child.kill();
    let _ = child.wait();
    result
}

/// Starts one VM with `--api-sock` and checks that it comes up and answers `GET /`.
fn probe_api(flick: &str, guest: &Path, dir: &Path) -> Result<(), String> {
    let cfg = dir.join("probe.json");
    let sock = dir.join("probe.sock");
    std::fs::write(
        &cfg,
        json!({
            "boot-source": {"kernel_image_path": guest, "boot_args": "tg.exit=halt tg.smp=0 tg.quiet=1"},
            "machine-config": {"vcpu_count": 1, "mem_size_mib": 32},
        })
        .to_string(),
    )
    .map_err(|e| e.to_string())?;
    let mut child = Command::new(flick)
        .arg("--api-sock")
        .arg(&sock)
        .arg("--config-file")
        .arg(&cfg)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    let res = loop {
        if let Ok(Some(_)) = child.try_wait() {
            let mut err = String::new();
            if let Some(mut s) = child.stderr.take() {
                use std::io::Read;
                let _ = s.read_to_string(&mut err);
            }
            break Err(err.trim().to_string());
        }
        if let Ok((200, _)) = flick_fixtures::http::request(&sock, "GET", "/", None) {
            break Ok(());
        }
        if t0.elapsed() > Duration::from_secs(5) {
            break Err("no API answer within 5 s".into());
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(&sock);
    let _ = std::fs::remove_file(&cfg);
    res
}

/// Per VM: when its log first held the `Guest-boot-time` line, and the value logged. Woken by
/// inotify on the log directory; every 100 ms (and on an event-queue overflow) it rescans the
/// logs not yet seen up.
fn watch(
    dir: &Path,
    n: usize,
    stop: &AtomicBool,
    parse: fn(&str) -> Option<f64>,
) -> (Vec<Option<Instant>>, Vec<Option<f64>>) {
    let mut ready: Vec<Option<Instant>> = vec![None; n];
    let mut boot: Vec<Option<f64>> = vec![None; n];
    let mut left = n;
    // SAFETY: plain inotify syscalls on a descriptor we own and close.
    let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
    if fd >= 0 {
        let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: `fd` is our inotify descriptor and `c` a NUL-terminated path that outlives
        // the call.
        unsafe { libc::inotify_add_watch(fd, c.as_ptr(), libc::IN_MODIFY) };
    }
    let mut check = |i: usize, now: Instant, ready: &mut Vec<Option<Instant>>, left: &mut usize| {
        if ready[i].is_some() {
            return;
        }
        let text = std::fs::read_to_string(dir.join(format!("vm{i}.log"))).unwrap_or_default();
        if let Some(b) = parse(&text) {
            ready[i] = Some(now);
            boot[i] = Some(b);
            *left -= 1;
        }
    };
    let mut last_scan = Instant::now();
    let mut buf = vec![0u8; 64 * 1024];
    while left > 0 && !stop.load(Ordering::SeqCst) {
        let mut rescan = fd < 0 || last_scan.elapsed() > Duration::from_millis(100);
        if fd >= 0 {
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one pollfd, then reads into our buffer.
            unsafe { libc::poll(&mut pfd, 1, 20) };
            let now = Instant::now();
            loop {
                // SAFETY: reads at most `buf.len()` bytes into `buf`, which we own.
                let r = unsafe { libc::read(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
                if r <= 0 {
                    break;
                }
                let mut off = 0usize;
                while off + 16 <= r as usize {
                    let mask = u32::from_ne_bytes(buf[off + 4..off + 8].try_into().unwrap());
                    let len =
                        u32::from_ne_bytes(buf[off + 12..off + 16].try_into().unwrap()) as usize;
                    let name = &buf[off + 16..off + 16 + len];
                    let name = name.split(|&b| b == 0).next().unwrap_or(&[]);
                    if mask & libc::IN_Q_OVERFLOW != 0 {
                        rescan = true;
                    } else if let Some(i) = std::str::from_utf8(name).ok().and_then(|s| {
                        s.strip_prefix("vm")?
                            .strip_suffix(".log")?
                            .parse::<usize>()
                            .ok()
                    }) {
                        if i < n {
                            check(i, now, &mut ready, &mut left);
                        }
                    }
                    off += 16 + len;
                }
            }
        } else {
            std::thread::sleep(Duration::from_millis(1));
        }
        if rescan {
            let now = Instant::now();
            for i in 0..n {
                check(i, now, &mut ready, &mut left);
            }
            last_scan = now;
        }
    }
    if fd >= 0 {
        // SAFETY: closes the inotify descriptor this function opened; nothing uses it after.
        unsafe { libc::close(fd) };
    }
    (ready, boot)
}
