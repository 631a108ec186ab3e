//! The balloon device (virtio-balloon) end to end: the test guest's own driver and Linux's
//! inflate and deflate on `PATCH /balloon`, the pages given to the balloon leave flick's resident
//! memory, statistics reach `GET /balloon/statistics`, hostile requests are refused, the API
//! refuses bad bodies, and a ballooned VM survives a snapshot.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const MIB: u64 = 1 << 20;

fn kib(value: &str) -> u64 {
    value.trim().trim_end_matches(" kB").trim().parse().unwrap()
}

/// Resident bytes of guest RAM (`size_mib` MiB) in `pid`: the mapping of that size, or a little
/// more (the kernel may merge it with a neighbouring anonymous mapping).
fn guest_rss(pid: u32, size_mib: u64) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let want = size_mib * 1024;
    let mut in_guest = false;
    let mut found = 0;
    let mut rss_kib = 0;
    for line in smaps.lines() {
        if let Some(size) = line.strip_prefix("Size:") {
            let size = kib(size);
            in_guest = size >= want && size < want + 4096;
            found += u32::from(in_guest);
        } else if let Some(rss) = line.strip_prefix("Rss:") {
            if in_guest {
                rss_kib += kib(rss);
            }
        }
    }
    assert_eq!(
        found, 1,
        "no single guest RAM mapping of {size_mib} MiB: {smaps}"
    );
    rss_kib * 1024
}

/// `VmRSS` of `pid`, in bytes.
fn process_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .map(kib)
        .unwrap()
        * 1024
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / MIB as f64
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// A flick with the API socket, its serial console in a file, its log in another; stdin piped
/// (the guest's console input). Killed on drop.
struct Vm {
    dir: TempDir,
    sock: PathBuf,
    console: PathBuf,
    child: Child,
}

impl Vm {
    fn start(tag: &str) -> Vm {
        let dir = TempDir::new(tag);
        Self::start_in(dir, tag)
    }

    fn start_in(dir: TempDir, tag: &str) -> Vm {
        let sock = dir.path(&format!("{tag}.sock"));
        let console = dir.path(&format!("{tag}.console"));
        let child = Command::new(flick_bin())
            .args(["--api-sock"])
            .arg(&sock)
            .args(["--level", "Info"])
            .stdin(Stdio::piped())
            .stdout(std::fs::File::create(&console).unwrap())
            .stderr(std::fs::File::create(dir.path(&format!("{tag}.log"))).unwrap())
            .spawn()
            .unwrap();
        wait_for_socket(&sock);
        Vm {
            dir,
            sock,
            console,
            child,
        }
    }

    fn call(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        api_call(&self.sock, method, path, body)
    }

    fn ok(&self, method: &str, path: &str, body: serde_json::Value) {
        let (status, answer) = self.call(method, path, Some(&body.to_string()));
        assert_eq!(status, 204, "{method} {path}: {answer}");
    }

    /// A 400 whose `fault_message` contains `needle`.
    fn refused(&self, method: &str, path: &str, body: Option<&str>, needle: &str) {
        let (status, answer) = self.call(method, path, body);
        assert_eq!(status, 400, "{method} {path}: {answer}");
        let message = json(&answer)["fault_message"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(
            message.contains(needle),
            "{method} {path}: {needle:?} not in {message:?}"
        );
    }

    fn get(&self, path: &str) -> serde_json::Value {
        let (status, answer) = self.call("GET", path, None);
        assert_eq!(status, 200, "GET {path}: {answer}");
        json(&answer)
    }

    /// Boots the test guest with `mem_mib` MiB and a balloon configured as `balloon`.
    fn boot_test_guest(&self, args: &str, mem_mib: u64, balloon: serde_json::Value) {
        self.ok(
            "PUT",
            "/machine-config",
            serde_json::json!({"vcpu_count": 1, "mem_size_mib": mem_mib}),
        );
        self.ok(
            "PUT",
            "/boot-source",
            serde_json::json!({"kernel_image_path": test_guest(),
                               "boot_args": format!("tg.smp=0 tg.exit=halt {args}")}),
        );
        self.ok("PUT", "/balloon", balloon);
        self.ok(
            "PUT",
            "/actions",
            serde_json::json!({"action_type": "InstanceStart"}),
        );
    }

    fn wait_console(&self, needle: &str) -> String {
        wait_for_text(&self.console, needle)
    }

    fn console_text(&self) -> String {
        std::fs::read_to_string(&self.console).unwrap_or_default()
    }

    /// Polls `GET /balloon/statistics` until `done` holds (or `timeout`).
    fn wait_stats(
        &self,
        timeout: Duration,
        what: &str,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let start = Instant::now();
        loop {
            let stats = self.get("/balloon/statistics");
            if done(&stats) {
                return stats;
            }
            assert!(
                start.elapsed() < timeout,
                "{what} never happened: {stats}\nconsole: {}",
                self.console_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The counter sample `family{labels}` of the metrics text.
fn metric(text: &str, sample: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {sample} in {text}"))
}

#[test]
fn guest_inflation_returns_its_pages_to_the_host_and_deflation_takes_them_back() {
    if !kvm_available() {
        return skip("no /dev/kvm");
    }
    const MEM_MIB: u64 = 256;
    const TOUCH_MIB: u64 = 64;
    let vm = Vm::start("inflate");
    let pid = vm.child.id();
    vm.boot_test_guest(
        &format!("tg.balloon={TOUCH_MIB}"),
        MEM_MIB,
        serde_json::json!({"amount_mib": 0, "deflate_on_oom": true,
                           "stats_polling_interval_s": 1}),
    );
    let console = vm.wait_console(&format!("balloon: touched {TOUCH_MIB} MiB"));
    assert!(
        console.contains("balloon: features stats=1 deflate_on_oom=1"),
        "{console}"
    );
    let before = guest_rss(pid, MEM_MIB);

    vm.ok(
        "PATCH",
        "/balloon",
        serde_json::json!({"amount_mib": TOUCH_MIB}),
    );
    let console = vm.wait_console("balloon: released pages read as zero:");
    let inflated = guest_rss(pid, MEM_MIB);

    let pages = TOUCH_MIB * 256;
    assert!(
        console.contains(&format!("balloon: inflated {pages} pages actual={pages}")),
        "{console}"
    );
    assert!(
        console.contains("balloon: released pages read as zero: yes"),
        "{console}"
    );
    eprintln!(
        "guest RAM resident: {:.1} MiB with {TOUCH_MIB} MiB touched, {:.1} MiB after inflating \
         {TOUCH_MIB} MiB (process VmRSS {:.1} MiB)",
        mib(before),
        mib(inflated),
        mib(process_rss(pid))
    );
    assert!(
        before > inflated && before - inflated >= TOUCH_MIB * MIB * 3 / 4,
        "inflating {TOUCH_MIB} MiB freed only {:.1} MiB ({:.1} -> {:.1} MiB)",
        mib(before.saturating_sub(inflated)),
        mib(before),
        mib(inflated)
    );
    assert_eq!(vm.get("/balloon")["amount_mib"], TOUCH_MIB);

    // The guest refreshes its numbers each time the 1 s poll returns its buffer.
    let usable_kib: u64 = console
        .lines()
        .find_map(|l| {
            l.strip_prefix("mem: usable=")?
                .strip_suffix(" KiB")?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no usable memory line: {console}"));
    let stats = vm.wait_stats(VM_TIMEOUT, "a second statistics update", |s| {
        s["minor_faults"].as_u64().unwrap_or(0) >= 2
    });
    assert_eq!(stats["target_mib"], TOUCH_MIB, "{stats}");
    assert_eq!(stats["actual_mib"], TOUCH_MIB, "{stats}");
    assert_eq!(stats["actual_pages"], pages, "{stats}");
    assert_eq!(stats["total_memory"], usable_kib * 1024, "{stats}");
    assert!(stats["free_memory"].is_u64(), "{stats}");
    assert!(stats.get("swap_in").is_none(), "not sent: {stats}");

    vm.ok("PATCH", "/balloon", serde_json::json!({"amount_mib": 0}));
    let console = vm.wait_console("testguest: done");
    assert!(
        console.contains(&format!("balloon: deflated {pages} pages actual=0")),
        "{console}"
    );
    let deflated = guest_rss(pid, MEM_MIB);
    eprintln!(
        "guest RAM resident after deflating and touching the pages again: {:.1} MiB",
        mib(deflated)
    );
    let (_, metrics) = vm.call("GET", "/metrics", None);
    let sample = |direction: &str| {
        metric(
            &metrics,
            &format!("flick_balloon_pages_total{{device=\"balloon\",direction=\"{direction}\"}}"),
        )
    };
    assert_eq!(sample("inflate"), pages);
    assert_eq!(sample("deflate"), pages);
    assert!(
        metric(
            &metrics,
            "flick_balloon_stats_updates_total{device=\"balloon\"}"
        ) >= 2
    );
    // All of it ran on the VMM thread under its seccomp filter.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(status.contains("Seccomp:\t2"), "{status}");
}

#[test]
fn hostile_balloon_requests_are_refused_and_the_device_keeps_working() {
    if !kvm_available() {
        return skip("no /dev/kvm");
    }
    let vm = Vm::start("hostile");
    vm.boot_test_guest(
        "tg.balloon=1 tg.balloon_hostile=1",
        64,
        serde_json::json!({"amount_mib": 1, "deflate_on_oom": false}),
    );
    let console = vm.wait_console("balloon: released pages read as zero:");
    for case in [
        "pfns-outside-ram",
        "huge-array",
        "writable-array",
        "array-outside-memory",
        "loop",
    ] {
        assert!(
            console.contains(&format!("balloon: hostile {case} done")),
            "{case}: {console}"
        );
    }
    assert!(
        console.contains("balloon: inflated 256 pages actual=256"),
        "{console}"
    );
    vm.ok("PATCH", "/balloon", serde_json::json!({"amount_mib": 0}));
    let console = vm.wait_console("testguest: done");
    assert!(
        console.contains("balloon: deflated 256 pages actual=0"),
        "{console}"
    );
    let (_, metrics) = vm.call("GET", "/metrics", None);
    let errors = |kind: &str| {
        metric(
            &metrics,
            &format!("flick_balloon_errors_total{{device=\"balloon\",kind=\"{kind}\"}}"),
        )
    };
    assert!(errors("invalid_pfn") >= 6, "{metrics}");
    assert!(errors("invalid_descriptor") >= 3, "{metrics}");
    assert_eq!(errors("release"), 0, "{metrics}");
    let log = std::fs::read_to_string(vm.dir.path("hostile.log")).unwrap();
    assert!(log.contains("balloon: refused"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
    assert_eq!(vm.get("/")["state"], "Running");
}

#[test]
fn balloon_requests_with_bad_bodies_or_in_the_wrong_phase_are_refused() {
    let vm = Vm::start("api");
    vm.refused("GET", "/balloon", None, "no balloon device");
    vm.refused("PUT", "/balloon", Some("{}"), "missing field `amount_mib`");
    vm.refused(
        "PUT",
        "/balloon",
        Some(r#"{"amount_mib": 1, "deflate_on_oom": true, "turbo": 1}"#),
        "unknown field `turbo`",
    );
    vm.refused(
        "PUT",
        "/balloon",
        Some(r#"{"amount_mib": -4, "deflate_on_oom": true}"#),
        "invalid value",
    );
    vm.refused(
        "PUT",
        "/balloon",
        Some(r#"{"amount_mib": 129, "deflate_on_oom": true}"#),
        "larger than guest memory (128 MiB)",
    );
    vm.refused(
        "PATCH",
        "/balloon",
        Some(r#"{"amount_mib": 1}"#),
        "before starting",
    );
    vm.refused("GET", "/balloon/statistics", None, "before starting");
    let balloon = serde_json::json!({"amount_mib": 8, "deflate_on_oom": false,
                                     "stats_polling_interval_s": 0});
    vm.ok("PUT", "/balloon", balloon.clone());
    assert_eq!(vm.get("/balloon"), balloon);
    assert_eq!(vm.get("/vm/config")["balloon"], balloon);
}

#[test]
fn after_boot_stats_cannot_be_switched_and_the_target_stays_within_guest_memory() {
    if !kvm_available() {
        return skip("no /dev/kvm");
    }
    let vm = Vm::start("phase");
    vm.boot_test_guest(
        "tg.count=1",
        64,
        serde_json::json!({"amount_mib": 0, "deflate_on_oom": false}),
    );
    vm.wait_console("testguest: done");
    vm.refused(
        "PUT",
        "/balloon",
        Some(r#"{"amount_mib": 1, "deflate_on_oom": true}"#),
        "not supported after starting",
    );
    vm.refused(
        "PATCH",
        "/balloon/statistics",
        Some(r#"{"stats_polling_interval_s": 1}"#),
        "cannot be turned on or off after boot",
    );
    vm.refused("GET", "/balloon/statistics", None, "not enabled");
    vm.refused(
        "PATCH",
        "/balloon",
        Some(r#"{"amount_mib": 65}"#),
        "larger than guest memory",
    );
    vm.refused(
        "PATCH",
        "/balloon",
        Some(r#"{"amount": 1}"#),
        "unknown field",
    );
    // The guest has no balloon driver running: the target is recorded all the same.
    vm.ok("PATCH", "/balloon", serde_json::json!({"amount_mib": 16}));
    assert_eq!(vm.get("/balloon")["amount_mib"], 16);
}

#[test]
fn balloon_from_the_config_file_is_inflated_at_boot() {
    if !kvm_available() {
        return skip("no /dev/kvm");
    }
    let mut config = guest_config(
        &test_guest(),
        "tg.smp=0 tg.balloon=4 tg.balloon_timeout_ms=100",
        1,
        64,
    );
    config["balloon"] = serde_json::json!({"amount_mib": 4, "deflate_on_oom": false});
    let out = run_config(&config, &[], b"");
    out.assert_clean_exit();
    assert!(
        out.stdout
            .contains("balloon: features stats=0 deflate_on_oom=0"),
        "{}",
        out.stdout
    );
    assert!(
        out.stdout
            .contains("balloon: inflated 1024 pages actual=1024"),
        "{}",
        out.stdout
    );
}

#[test]
fn a_restored_balloon_keeps_its_settings_and_returns_pages_of_the_memory_file() {
    if !kvm_available() {
        return skip("no /dev/kvm");
    }
    let source = Vm::start("snap-source");
    source.boot_test_guest(
        "tg.balloon=8",
        64,
        serde_json::json!({"amount_mib": 0, "deflate_on_oom": true,
                           "stats_polling_interval_s": 1}),
    );
    source.wait_console("balloon: touched 8 MiB");
    // A target below the 8 MiB the guest waits for: recorded, not acted on.
    source.ok("PATCH", "/balloon", serde_json::json!({"amount_mib": 4}));
    source.wait_stats(VM_TIMEOUT, "a statistics update", |s| {
        s["minor_faults"].as_u64().unwrap_or(0) >= 2
    });
    source.ok("PATCH", "/vm", serde_json::json!({"state": "Paused"}));
    let sent_before = source.get("/balloon/statistics")["minor_faults"]
        .as_u64()
        .unwrap();
    let state = source.dir.path("vm.state");
    let mem = source.dir.path("vm.mem");
    source.ok(
        "PUT",
        "/snapshot/create",
        serde_json::json!({"snapshot_path": state, "mem_file_path": mem}),
    );

    let restored = Vm::start("snap-restored");
    restored.ok(
        "PUT",
        "/snapshot/load",
        serde_json::json!({"snapshot_path": state,
                           "mem_backend": {"backend_type": "File", "backend_path": mem},
                           "resume_vm": true}),
    );
    assert_eq!(
        restored.get("/balloon"),
        serde_json::json!({"amount_mib": 4, "deflate_on_oom": true,
                           "stats_polling_interval_s": 1})
    );
    // The statistics buffer the device held came through: the poll still reaches the guest.
    restored.wait_stats(VM_TIMEOUT, "a statistics update after restore", |s| {
        s["minor_faults"].as_u64().unwrap_or(0) > sent_before
    });
    restored.ok("PATCH", "/balloon", serde_json::json!({"amount_mib": 8}));
    // The touched pages come from the memory file (mapped privately): released, they read as
    // zero rather than as the file's copy.
    let console = restored.wait_console("balloon: released pages read as zero:");
    assert!(
        console.contains("balloon: inflated 2048 pages actual=2048"),
        "{console}"
    );
    assert!(
        console.contains("balloon: released pages read as zero: yes"),
        "{console}"
    );
    let stats = restored.get("/balloon/statistics");
    assert_eq!(stats["actual_mib"], 8, "{stats}");
    restored.ok("PATCH", "/balloon", serde_json::json!({"amount_mib": 0}));
    let console = restored.wait_console("testguest: done");
    assert!(
        console.contains("balloon: deflated 2048 pages actual=0"),
        "{console}"
    );
    let (_, metrics) = restored.call("GET", "/metrics", None);
    let errors = metric(
        &metrics,
        "flick_balloon_errors_total{device=\"balloon\",kind=\"release\"}",
    );
    assert_eq!(errors, 0, "{metrics}");
}

/// `lapic=notscdeadline`: the guest kernel's tick is periodic (no NO_HZ, no high-resolution
/// timers); on a TSC-deadline LAPIC it is emulated with one-shot timers and each late tick is
/// caught up one by one. When the host is so loaded that the emulated guest kernel needs longer
/// than a tick (4 ms) to process one, it never catches up (seen here: boots stuck for over 10
/// minutes in `tick_handle_periodic`). A LAPIC in periodic mode drops late ticks instead.
const LINUX_BOOT_ARGS: &str = "console=ttyS0 reboot=k panic=1 lapic=notscdeadline flick.init=serve";

/// A hang guard, not a performance bound (see tests/linux.rs: under PVM a Linux boot takes
/// minutes; on a loaded host, user space here was seen to start 11 minutes after InstanceStart,
/// and once not within 15).
const LINUX_TIMEOUT: Duration = Duration::from_secs(1500);

fn artifact(var: &str) -> Option<PathBuf> {
    let path = std::env::var_os(var).map(PathBuf::from);
    if path.is_none() {
        eprintln!("skipping: {var} is not set (eval \"$(scripts/guest-artifacts.sh)\")");
    }
    path
}

fn write_console_line(vm: &mut Vm, line: &str) {
    let stdin = vm.child.stdin.as_mut().unwrap();
    stdin.write_all(line.as_bytes()).unwrap();
    stdin.write_all(b"\n").unwrap();
    stdin.flush().unwrap();
}

fn wait_console_for(vm: &Vm, needle: &str, timeout: Duration) -> String {
    let start = Instant::now();
    loop {
        let text = vm.console_text();
        if text.contains(needle) {
            return text;
        }
        assert!(
            start.elapsed() < timeout,
            "{needle:?} never appeared on the console: {text}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn copy_rootfs(dir: &Path, rootfs: &Path) -> PathBuf {
    let image = dir.join("rootfs.ext4");
    std::fs::copy(rootfs, &image).unwrap();
    image
}

#[test]
fn linux_balloon_driver_inflates_on_patch_and_reports_statistics() {
    if !kvm_available() {
        return skip("no /dev/kvm");
    }
    let (Some(kernel), Some(rootfs)) = (
        artifact("FLICK_KERNEL_VMLINUX"),
        artifact("FLICK_ROOTFS_EXT4"),
    ) else {
        return;
    };
    const MEM_MIB: u64 = 256;
    const TARGET_MIB: u64 = 64;
    let mut vm = Vm::start("linux");
    let start = Instant::now();
    let image = copy_rootfs(&vm.dir.path(""), &rootfs);
    vm.ok(
        "PUT",
        "/machine-config",
        serde_json::json!({"vcpu_count": 1, "mem_size_mib": MEM_MIB}),
    );
    vm.ok(
        "PUT",
        "/boot-source",
        serde_json::json!({"kernel_image_path": kernel,
                           "boot_args": LINUX_BOOT_ARGS}),
    );
    vm.ok(
        "PUT",
        "/drives/rootfs",
        serde_json::json!({"drive_id": "rootfs", "path_on_host": image,
                           "is_root_device": true, "is_read_only": false}),
    );
    vm.ok(
        "PUT",
        "/balloon",
        serde_json::json!({"amount_mib": 0, "deflate_on_oom": true,
                           "stats_polling_interval_s": 1}),
    );
    vm.ok(
        "PUT",
        "/actions",
        serde_json::json!({"action_type": "InstanceStart"}),
    );
    wait_console_for(&vm, "WAITING", LINUX_TIMEOUT);
    eprintln!("Linux reached user space after {:?}", start.elapsed());
    // Touch guest memory from user space (a string doubled up to 32 MiB: the copies run
    // natively, only page faults enter the guest kernel), free it, and stay.
    write_console_line(
        &mut vm,
        "awk 'BEGIN { s = \"0123456789abcdef\"; while (length(s) < 32 * 1048576) s = s s; \
         print length(s) }'; free -m; echo TOUCHED; sleep 3600",
    );
    let console = wait_console_for(&vm, "TOUCHED", LINUX_TIMEOUT);
    let pid = vm.child.id();
    let before = guest_rss(pid, MEM_MIB);

    vm.ok(
        "PATCH",
        "/balloon",
        serde_json::json!({"amount_mib": TARGET_MIB}),
    );
    let stats = vm.wait_stats(LINUX_TIMEOUT, "inflation to the target", |s| {
        s["actual_mib"].as_u64().unwrap_or(0) >= TARGET_MIB
    });
    let after = guest_rss(pid, MEM_MIB);
    eprintln!(
        "Linux guest RAM resident: {:.1} MiB after touching, {:.1} MiB with the balloon at \
         {TARGET_MIB} MiB (inflated {:?} after boot start)\n{}",
        mib(before),
        mib(after),
        start.elapsed(),
        console
            .lines()
            .skip_while(|l| !l.contains("total"))
            .take(3)
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(stats["target_mib"], TARGET_MIB, "{stats}");
    assert!(
        before > after && before - after >= 8 * MIB,
        "inflating {TARGET_MIB} MiB freed only {:.1} MiB ({:.1} -> {:.1} MiB)",
        mib(before.saturating_sub(after)),
        mib(before),
        mib(after)
    );
    // The Linux driver's own numbers.
    let stats = vm.wait_stats(LINUX_TIMEOUT, "statistics from the Linux driver", |s| {
        s["total_memory"].as_u64().unwrap_or(0) > 0
    });
    eprintln!("statistics: {stats}");
    let total = stats["total_memory"].as_u64().unwrap();
    assert!(
        total <= MEM_MIB * MIB && total > MEM_MIB * MIB / 2,
        "{stats}"
    );
    // The memory counters; this guest kernel has no VM event counters (CONFIG_VM_EVENT_COUNTERS),
    // so its driver sends no swap or fault numbers.
    for field in ["free_memory", "available_memory", "disk_caches"] {
        assert!(stats[field].is_u64(), "{field}: {stats}");
    }
}
