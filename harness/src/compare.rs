//! The launch comparison: each variant's repetitions run back to back (interleaving variants
//! slows the container runtimes down: cgroup clean-up of the previous run), with the host load
//! recorded before and after each variant.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::host;
use crate::measure::{self, ApiRequest, Outcome, Spec};

pub const GUEST_MEM_MIB: u64 = 128;
const TESTGUEST_ARGS: &str = "tg.smp=0 tg.quiet=1";
const RESTORE_ARGS: &str = "tg.smp=0 tg.quiet=1 tg.count=100000000 tg.delay_ms=1 tg.exit=halt";
pub const LINUX_MARKER: &str = "Run /init as init process";
/// Kernel command line of the Linux variants that run a command in user space.
const LINUX_ECHO_ARGS: &str = "console=ttyS0 reboot=k panic=1 quiet i8042.nokbd i8042.noaux";
/// The containers' workload, run in the guest's user space by the Linux echo variants.
const ECHO_COMMAND: &str = "busybox echo hi";
/// Restores started at once to measure how many restored Linux microVMs start per second.
const RESTORE_BURST: usize = 10;
/// The Linux variants, run only with --with-linux or when --only names them (they are slow
/// where guest kernel code is emulated).
pub const LINUX_VARIANTS: &[&str] = &[
    "flick-linux",
    "flick-linux-echo",
    "flick-linux-restore-echo",
];

pub struct Opts {
    pub runs: usize,
    pub linux_runs: usize,
    pub warmup: usize,
    pub vmms: Vec<(String, String)>,
    pub only: Option<Vec<String>>,
    pub with_linux: bool,
    pub repo: PathBuf,
    pub flick: String,
    pub guest_dir: PathBuf,
    pub busybox: String,
    /// Sample /proc/PID/smaps during VMM runs (off: measures the sampler's own cost).
    pub smaps: bool,
    /// Print every run's status and output tails.
    pub verbose: bool,
    /// Longest wait for an idle host before each variant.
    pub settle: Duration,
}

/// What a variant measures and how it ended up.
pub struct VariantResult {
    pub name: String,
    pub description: String,
    /// What "spawn → end" means for this variant: "exit", "Run /init", "API ready", ...
    pub end_label: String,
    pub command: String,
    pub is_vmm: bool,
    pub skipped: Option<String>,
    pub notes: Vec<String>,
    pub runs: Vec<Outcome>,
    pub failures: Vec<String>,
    pub load_before: String,
    pub load_after: String,
    /// Host CPU idle share (%) over the 0.5 s before the variant started.
    pub idle_before: f64,
}

impl VariantResult {
    fn new(name: &str, description: &str) -> Self {
        VariantResult {
            name: name.into(),
            description: description.into(),
            end_label: "exit".into(),
            command: String::new(),
            is_vmm: false,
            skipped: None,
            notes: Vec::new(),
            runs: Vec::new(),
            failures: Vec::new(),
            load_before: String::new(),
            load_after: String::new(),
            idle_before: f64::NAN,
        }
    }
}

/// How to run one variant: a spec per run index, plus clean-up after a failed run.
struct Plan {
    spec: Box<dyn Fn(usize) -> Spec>,
    after_failure: Option<Box<dyn Fn(usize)>>,
    runs: usize,
    warmup: usize,
}

pub const DEFAULT_VARIANTS: &[&str] = &[
    "process",
    "unshare",
    "crun",
    "runc",
    "podman",
    "flick-testguest",
    "flick-api-ready",
    "flick-restore",
    "qemu-microvm",
];

pub fn known_variants(vmms: &[(String, String)]) -> Vec<String> {
    let mut v: Vec<String> = DEFAULT_VARIANTS.iter().map(|s| s.to_string()).collect();
    for (n, _) in vmms {
        v.extend([n.clone(), format!("{n}-api-ready"), format!("{n}-restore")]);
    }
    v.extend(LINUX_VARIANTS.iter().map(|s| s.to_string()));
    v
}

pub fn selected(opts: &Opts) -> Vec<String> {
    let all = known_variants(&opts.vmms);
    match &opts.only {
        Some(only) => all.into_iter().filter(|v| only.contains(v)).collect(),
        None => all
            .into_iter()
            .filter(|v| !LINUX_VARIANTS.contains(&v.as_str()) || opts.with_linux)
            .collect(),
    }
}

fn argv(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn quote(args: &[String]) -> String {
    args.iter()
        .map(|a| {
            if a.is_empty() || a.contains(|c: char| c.is_whitespace() || "'\"$;&|".contains(c)) {
                format!("'{}'", a.replace('\'', "'\\''"))
            } else {
                a.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn write_vm_config(
    path: &Path,
    kernel: &Path,
    initrd: Option<&Path>,
    boot_args: &str,
    mem_mib: u64,
) {
    let mut boot = json!({"kernel_image_path": kernel, "boot_args": boot_args});
    if let Some(i) = initrd {
        boot["initrd_path"] = json!(i);
    }
    // `drives` (empty) because Firecracker's config-file parser requires the key.
    let cfg = json!({
        "boot-source": boot,
        "drives": [],
        "machine-config": {"vcpu_count": 1, "mem_size_mib": mem_mib},
    });
    std::fs::write(path, serde_json::to_string_pretty(&cfg).unwrap()).expect("write vm config");
}

/// The work directory: rootfs, OCI bundle, VM configs, logs. Removed at the end.
pub struct Work {
    pub dir: PathBuf,
    pub keep: bool,
}

impl Drop for Work {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("work directory kept: {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn make_rootfs(dir: &Path, busybox: &str) -> std::io::Result<()> {
    for d in ["bin", "proc", "dev", "sys", "tmp", "etc", "root"] {
        std::fs::create_dir_all(dir.join(d))?;
    }
    std::fs::copy(busybox, dir.join("bin/busybox"))?;
    Ok(())
}

fn make_bundle(bundle: &Path, rootfs: &Path) -> Result<(), String> {
    std::fs::create_dir_all(bundle).map_err(|e| e.to_string())?;
    let out = Command::new("runc")
        .args(["spec", "--bundle"])
        .arg(bundle)
        .output()
        .map_err(|e| format!("runc spec: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "runc spec failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let path = bundle.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| e.to_string())?;
    let mut cfg: serde_json::Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    cfg["process"]["terminal"] = json!(false);
    cfg["process"]["args"] = json!(["/bin/busybox", "echo", "hi"]);
    cfg["root"]["path"] = json!(rootfs);
    cfg["root"]["readonly"] = json!(true);
    std::fs::write(&path, serde_json::to_string_pretty(&cfg).unwrap()).map_err(|e| e.to_string())
}

fn help_text(flick: &str) -> String {
    Command::new(flick)
        .arg("--help")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
        })
        .unwrap_or_default()
}

pub fn run_all(opts: &Opts) -> Vec<VariantResult> {
    let work = Work {
        dir: std::env::temp_dir().join(format!("flick-bench.{}", std::process::id())),
        keep: opts.verbose,
    };
    std::fs::create_dir_all(&work.dir).expect("create work dir");
    let rootfs = work.dir.join("rootfs");
    let rootfs_ok = make_rootfs(&rootfs, &opts.busybox)
        .map_err(|e| format!("cannot build the busybox rootfs from {}: {e}", opts.busybox));

    let mut results = Vec::new();
    for name in selected(opts) {
        if measure::interrupted() {
            break;
        }
        eprintln!("== {name}");
        let mut r = VariantResult::new(&name, "");
        let plan = plan(&name, opts, &work.dir, &rootfs, &rootfs_ok, &mut r);
        match plan {
            Err(reason) => {
                eprintln!("   skipped: {reason}");
                r.skipped = Some(reason);
            }
            Ok(plan) => {
                r.idle_before = host::settle(85.0, opts.settle);
                execute(&plan, &mut r, opts.smaps, opts.verbose)
            }
        }
        results.push(r);
    }
    results
}

fn execute(plan: &Plan, r: &mut VariantResult, smaps: bool, verbose: bool) {
    let spec = |i: usize| {
        let mut s = (plan.spec)(i);
        if !smaps {
            s.guest_mem_kib = None;
        }
        s
    };
    r.command = quote(&(plan.spec)(0).argv);
    eprintln!("   {}", r.command);
    r.load_before = host::loadavg();
    for i in 0..plan.warmup {
        let o = measure::run(&spec(1_000_000 + i));
        if !o.ok {
            if let Some(f) = &plan.after_failure {
                f(1_000_000 + i);
            }
            if i == 0 {
                let e = o.error.unwrap_or_default();
                eprintln!("   skipped: {e}");
                r.skipped = Some(format!("does not run here: {e}"));
                r.load_after = host::loadavg();
                return;
            }
        }
    }
    let started = Instant::now();
    for i in 0..plan.runs {
        if measure::interrupted() {
            break;
        }
        let o = measure::run(&spec(i));
        if !o.ok && measure::interrupted() {
            break;
        }
        if !o.ok {
            if let Some(f) = &plan.after_failure {
                f(i);
            }
            let e = o.error.clone().unwrap_or_default();
            eprintln!("   run {i}: failed: {e}");
            if plan.warmup == 0 && i == 0 {
                r.skipped = Some(format!("does not run here: {e}"));
                r.load_after = host::loadavg();
                return;
            }
            r.failures.push(e);
            continue;
        }
        if plan.runs <= 5 || verbose {
            eprintln!(
                "   run {i}: {:.1} ms to {}",
                o.end_ms.unwrap_or(f64::NAN),
                r.end_label
            );
        }
        if verbose {
            let tail = |t: &str| {
                t.chars()
                    .rev()
                    .take(300)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<String>()
            };
            eprintln!(
                "     status {}; stdout: {:?}; stderr: {:?}",
                o.status,
                tail(&o.stdout),
                tail(&o.stderr)
            );
        }
        r.runs.push(o);
    }
    r.load_after = host::loadavg();
    eprintln!(
        "   {} runs in {:.1} s, host idle {:.0}% before, load {} -> {}",
        r.runs.len(),
        started.elapsed().as_secs_f64(),
        r.idle_before,
        r.load_before,
        r.load_after
    );
}

fn plan(
    name: &str,
    opts: &Opts,
    work: &Path,
    rootfs: &Path,
    rootfs_ok: &Result<(), String>,
    r: &mut VariantResult,
) -> Result<Plan, String> {
    let runs = opts.runs;
    let warmup = opts.warmup.max(1);
    let timeout = Duration::from_secs(30);
    let testguest = opts.guest_dir.join("testguest.elf");
    let vm_json = work.join("vm.json");
    let need_testguest = || -> Result<(), String> {
        if !testguest.is_file() {
            return Err(format!("test guest {} not built", testguest.display()));
        }
        if !Path::new("/dev/kvm").exists() {
            return Err("/dev/kvm is missing".into());
        }
        write_vm_config(&vm_json, &testguest, None, TESTGUEST_ARGS, GUEST_MEM_MIB);
        Ok(())
    };
    let bb = opts.busybox.clone();
    match name {
        "process" => {
            r.description = "fork+exec of `busybox echo hi` (busybox-static)".into();
            if !Path::new(&bb).is_file() {
                return Err(format!("{bb} not found (install busybox-static)"));
            }
            Ok(Plan {
                spec: Box::new(move |_| Spec {
                    argv: vec![bb.clone(), "echo".into(), "hi".into()],
                    timeout,
                    ..Default::default()
                }),
                after_failure: None,
                runs,
                warmup,
            })
        }
        "unshare" => {
            r.description = "`unshare` into new mount, UTS, IPC, PID (--fork) and network namespaces, chroot (--root) into the busybox rootfs, `busybox echo hi`".into();
            rootfs_ok.clone()?;
            host::which("unshare").ok_or("unshare not found (install util-linux)")?;
            let root = rootfs.display().to_string();
            Ok(Plan {
                spec: Box::new(move |_| Spec {
                    argv: vec![
                        "unshare".into(),
                        "--mount".into(),
                        "--uts".into(),
                        "--ipc".into(),
                        "--pid".into(),
                        "--fork".into(),
                        "--net".into(),
                        format!("--root={root}"),
                        "/bin/busybox".into(),
                        "echo".into(),
                        "hi".into(),
                    ],
                    timeout,
                    ..Default::default()
                }),
                after_failure: None,
                runs,
                warmup,
            })
        }
        "crun" | "runc" => {
            let rt = name.to_string();
            r.description = format!("`{rt} run` of an OCI bundle (config from `runc spec`, terminal off, read-only busybox rootfs), `busybox echo hi`");
            rootfs_ok.clone()?;
            host::which(&rt).ok_or(format!("{rt} not installed"))?;
            host::which("runc").ok_or("runc (needed for `runc spec`) not installed")?;
            let bundle = work.join(format!("bundle-{rt}"));
            make_bundle(&bundle, rootfs)?;
            let b = bundle.display().to_string();
            let id = move |i: usize| format!("flickbench-{}-{i}", std::process::id());
            // crun 1.8 refuses a hybrid cgroup layout (v1 controllers + an empty v2 at
            // /sys/fs/cgroup/unified). scripts/bench.sh mounts the v1 hugetlb controller for
            // the run, which crun accepts; without that, run crun in a private mount namespace
            // with the v2 mount removed (adds unshare + sh, ~3 ms).
            let mut wrap = false;
            if rt == "crun" {
                let probe = Command::new("crun")
                    .args(["run", "--bundle", &b, &id(999_999)])
                    .stdin(Stdio::null())
                    .output()
                    .map_err(|e| format!("crun: {e}"))?;
                let err = String::from_utf8_lossy(&probe.stderr);
                if !probe.status.success() && err.contains("hybrid") {
                    wrap = true;
                    r.notes.push("crun refused the hybrid cgroup layout, so it runs inside `unshare -m sh -c 'umount /sys/fs/cgroup/unified; exec crun run ...'` (adds ~3 ms); scripts/bench.sh avoids this by mounting the v1 hugetlb controller for the run".into());
                } else if !probe.status.success() {
                    let _ = Command::new("crun")
                        .args(["delete", "-f", &id(999_999)])
                        .output();
                }
            }
            r.notes.push(format!("peak RSS and CPU time are those of the `{rt}` process tree it waits for, not of the container alone"));
            let rt2 = rt.clone();
            Ok(Plan {
                spec: Box::new(move |i| {
                    let argv = if wrap {
                        vec![
                            "unshare".into(),
                            "-m".into(),
                            "sh".into(),
                            "-c".into(),
                            format!(
                                "umount /sys/fs/cgroup/unified && exec {rt} run --bundle '{b}' {}",
                                id(i)
                            ),
                        ]
                    } else {
                        vec![
                            rt.clone(),
                            "run".into(),
                            "--bundle".into(),
                            b.clone(),
                            id(i),
                        ]
                    };
                    Spec {
                        argv,
                        timeout,
                        ..Default::default()
                    }
                }),
                after_failure: Some(Box::new(move |i| {
                    let _ = Command::new(&rt2)
                        .args(["delete", "--force", &id(i)])
                        .output();
                })),
                runs,
                warmup,
            })
        }
        "podman" => {
            r.description = "`podman run --rm --network none --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 --rootfs DIR` (its own copy of the busybox rootfs, podman writes into it), `busybox echo hi`".into();
            rootfs_ok.clone()?;
            host::which("podman").ok_or(
                "podman not installed (optional; `apt-get install podman` failed or was not run)",
            )?;
            let proot = work.join("rootfs-podman");
            make_rootfs(&proot, &opts.busybox).map_err(|e| e.to_string())?;
            let p = proot.display().to_string();
            r.notes.push("peak RSS and CPU time are those of the `podman` process tree it waits for; conmon and the container are not in it".into());
            Ok(Plan {
                spec: Box::new(move |_| Spec {
                    argv: argv(&[
                        "podman",
                        "run",
                        "--rm",
                        "--network",
                        "none",
                        "--ulimit",
                        "nofile=1024:1024",
                        "--ulimit",
                        "nproc=1024:1024",
                        // `--rootfs` is a switch: the first argument after the options is the
                        // rootfs and everything after it is the command, so options go first.
                        "--rootfs",
                        &p,
                        "/bin/busybox",
                        "echo",
                        "hi",
                    ]),
                    timeout: Duration::from_secs(60),
                    ..Default::default()
                }),
                after_failure: None,
                runs,
                warmup: warmup.max(2),
            })
        }
        "flick-testguest" => {
            r.description = format!("flick boots the test guest (`testguest.elf`, `{TESTGUEST_ARGS}`, 1 vCPU, {GUEST_MEM_MIB} MiB); it resets through the i8042 and flick exits 0");
            r.is_vmm = true;
            need_testguest()?;
            let flick = opts.flick.clone();
            let cfg = vm_json.display().to_string();
            Ok(Plan {
                spec: Box::new(move |_| Spec {
                    argv: argv(&[
                        &flick,
                        "--no-api",
                        "--config-file",
                        &cfg,
                        "--boot-timer",
                        "--level",
                        "Info",
                    ]),
                    timeout,
                    guest_mem_kib: Some(GUEST_MEM_MIB * 1024),
                    ..Default::default()
                }),
                after_failure: None,
                runs,
                warmup,
            })
        }
        "flick-api-ready" => plan_api_ready("flick", &opts.flick, work, runs, warmup, r),
        "flick-restore" => {
            need_testguest()?;
            plan_restore("flick", &opts.flick, work, &testguest, runs, warmup, r)
        }
        "qemu-microvm" => {
            r.description = format!("QEMU `-M microvm` boots the PVH test guest (`testguest-pvh.elf`, `{TESTGUEST_ARGS}`, 1 vCPU, {GUEST_MEM_MIB} MiB); it ends on the guest's reset (`-no-reboot`)");
            r.is_vmm = true;
            let pvh = opts.guest_dir.join("testguest-pvh.elf");
            if !pvh.is_file() {
                return Err(format!("{} not built", pvh.display()));
            }
            host::which("qemu-system-x86_64")
                .ok_or("qemu-system-x86_64 not installed (apt-get install qemu-system-x86)")?;
            let k = pvh.display().to_string();
            let mem = GUEST_MEM_MIB.to_string();
            Ok(Plan {
                spec: Box::new(move |_| Spec {
                    argv: argv(&[
                        "qemu-system-x86_64",
                        "-M",
                        "microvm,x-option-roms=off,rtc=off",
                        "-accel",
                        "kvm",
                        "-cpu",
                        "host",
                        "-m",
                        &mem,
                        "-smp",
                        "1",
                        "-nodefaults",
                        "-no-user-config",
                        "-nographic",
                        "-serial",
                        "stdio",
                        "-no-reboot",
                        "-kernel",
                        &k,
                        "-append",
                        TESTGUEST_ARGS,
                    ]),
                    timeout,
                    guest_mem_kib: Some(GUEST_MEM_MIB * 1024),
                    ..Default::default()
                }),
                after_failure: None,
                runs,
                warmup,
            })
        }
        "flick-linux" => {
            r.description = "flick boots the project's Linux 6.1 kernel + busybox initramfs (`scripts/guest-artifacts.sh`, 1 vCPU, 128 MiB): spawn → the serial line `Run /init as init process`, then killed (guest user space cannot run on a PVM host)".into();
            r.end_label = "Run /init".into();
            r.is_vmm = true;
            plan_linux(opts, work)
        }
        "flick-linux-echo" => {
            r.description = format!("flick cold-boots the project's Linux 6.1 kernel + busybox initramfs (1 vCPU, {GUEST_MEM_MIB} MiB, `quiet`) whose init runs `{ECHO_COMMAND}` with the same busybox binary as the containers (`flick.init=echo`), then reboots: spawn → the `hi` line, and spawn → flick's exit");
            r.end_label = "hi".into();
            r.is_vmm = true;
            plan_linux_echo(opts, work)
        }
        "flick-linux-restore-echo" => {
            r.description = format!("a new flick process restores (`--restore-snapshot --resume`) a snapshot of that Linux guest taken while its init waited on the console for a command (`flick.init=serve`); flick's stdin carries `{ECHO_COMMAND}`, the guest runs it and reboots: spawn → `hi`, spawn → exit. Also: {RESTORE_BURST} such restores started at once");
            r.end_label = "hi".into();
            r.is_vmm = true;
            plan_linux_restore_echo(opts, work, r)
        }
        vmm => {
            // `--vmm NAME=PATH` gives NAME (the boot), NAME-api-ready and NAME-restore: the
            // same measurements as flick's, with that binary.
            let find = |n: &str| opts.vmms.iter().find(|(v, _)| v == n).map(|(_, p)| p);
            if let Some(path) = vmm.strip_suffix("-api-ready").and_then(find) {
                return plan_api_ready(vmm, path, work, runs, warmup, r);
            }
            if let Some(path) = vmm.strip_suffix("-restore").and_then(find) {
                need_testguest()?;
                return plan_restore(vmm, path, work, &testguest, runs, warmup, r);
            }
            let Some(path) = find(vmm) else {
                return Err(format!("unknown variant {vmm}"));
            };
            r.description = format!("`{path}` (a Firecracker-compatible VMM) boots the test guest with the same config as flick-testguest, timed from its `Guest-boot-time` log line");
            r.is_vmm = true;
            need_testguest()?;
            plan_vmm(path, &vm_json, work, vmm, runs, warmup, r)
        }
    }
}

/// Any Firecracker-compatible VMM: find the flags it accepts (a log file keeps Firecracker's
/// log lines, which go to stdout by default, out of the serial output).
fn plan_vmm(
    path: &str,
    cfg: &Path,
    work: &Path,
    name: &str,
    runs: usize,
    warmup: usize,
    r: &mut VariantResult,
) -> Result<Plan, String> {
    if !Path::new(path).is_file() {
        return Err(format!("{path} does not exist"));
    }
    let log = work.join(format!("{name}.log"));
    let c = cfg.display().to_string();
    let base = argv(&[path, "--no-api", "--config-file", &c, "--boot-timer"]);
    let l = log.display().to_string();
    let candidates: Vec<(Vec<String>, bool)> = vec![
        (
            [&base[..], &argv(&["--level", "Info", "--log-path", &l])].concat(),
            true,
        ),
        ([&base[..], &argv(&["--log-path", &l])].concat(), true),
        ([&base[..], &argv(&["--level", "Info"])].concat(), false),
        (base.clone(), false),
    ];
    let mut errors = Vec::new();
    for (args, with_log) in candidates {
        let spec = Spec {
            argv: args.clone(),
            timeout: Duration::from_secs(30),
            guest_mem_kib: Some(GUEST_MEM_MIB * 1024),
            log_file: with_log.then(|| log.clone()),
            ..Default::default()
        };
        let o = measure::run(&spec);
        if !o.ok {
            errors.push(format!(
                "`{}`: {}",
                quote(&args[1..]),
                o.error.unwrap_or_default()
            ));
            continue;
        }
        if o.boot_timer_ms.is_none() {
            errors.push(format!(
                "`{}`: exited 0 but logged no Guest-boot-time line",
                quote(&args[1..])
            ));
            continue;
        }
        if parse_in(&o.stdout) {
            r.notes.push("this VMM logs to stdout, so spawn → first output may be a log line rather than a serial byte".into());
        }
        return Ok(Plan {
            spec: Box::new(move |_| spec.clone()),
            after_failure: None,
            runs,
            warmup,
        });
    }
    Err(format!("cannot run: {}", errors.join("; ")))
}

fn parse_in(stdout: &str) -> bool {
    measure::parse_boot_time_ms(stdout).is_some()
}

/// The project's Linux guest: vmlinux and the busybox initramfs (built or found in the cache).
fn linux_artifacts(opts: &Opts) -> Result<(PathBuf, PathBuf), String> {
    let script = opts.repo.join("scripts/guest-artifacts.sh");
    if !script.is_file() {
        return Err(format!("{} not found", script.display()));
    }
    if !Path::new("/dev/kvm").exists() {
        return Err("/dev/kvm is missing".into());
    }
    eprintln!("   building or finding the Linux guest (scripts/guest-artifacts.sh; ~5 min when not cached)");
    let out = Command::new("bash")
        .arg(&script)
        .current_dir(&opts.repo)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last: Vec<&str> = err.lines().rev().take(3).collect();
        return Err(format!(
            "scripts/guest-artifacts.sh failed ({}): {}",
            out.status,
            last.into_iter().rev().collect::<Vec<_>>().join(" | ")
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let get = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .map(|v| PathBuf::from(v.trim().trim_matches('"').trim_matches('\'')))
    };
    let kernel =
        get("FLICK_KERNEL_VMLINUX").ok_or("guest-artifacts.sh printed no FLICK_KERNEL_VMLINUX")?;
    let initrd = get("FLICK_INITRAMFS").ok_or("guest-artifacts.sh printed no FLICK_INITRAMFS")?;
    Ok((kernel, initrd))
}

fn plan_linux(opts: &Opts, work: &Path) -> Result<Plan, String> {
    let (kernel, initrd) = linux_artifacts(opts)?;
    let cfg = work.join("vm-linux.json");
    write_vm_config(
        &cfg,
        &kernel,
        Some(&initrd),
        "console=ttyS0 reboot=k panic=1 i8042.nokbd i8042.noaux",
        GUEST_MEM_MIB,
    );
    let flick = opts.flick.clone();
    let c = cfg.display().to_string();
    Ok(Plan {
        spec: Box::new(move |_| Spec {
            argv: argv(&[
                &flick,
                "--no-api",
                "--config-file",
                &c,
                "--boot-timer",
                "--level",
                "Info",
            ]),
            timeout: Duration::from_secs(600),
            guest_mem_kib: Some(GUEST_MEM_MIB * 1024),
            stop_marker: Some(LINUX_MARKER.into()),
            ..Default::default()
        }),
        after_failure: None,
        runs: opts.linux_runs,
        warmup: 0,
    })
}

/// Pauses the VM behind `sock` and writes a full snapshot to `snap` and `mem`.
fn pause_and_snapshot(sock: &Path, snap: &Path, mem: &Path) -> Result<(), String> {
    let call = |m: &str, p: &str, b: String| -> Result<(), String> {
        match flick_fixtures::http::request(sock, m, p, Some(&b)) {
            Ok((c, _)) if (200..300).contains(&c) => Ok(()),
            Ok((c, body)) => Err(format!("{m} {p} answered {c}: {}", body.trim())),
            Err(e) => Err(format!("{m} {p}: {e}")),
        }
    };
    call("PATCH", "/vm", json!({"state": "Paused"}).to_string())?;
    call(
        "PUT",
        "/snapshot/create",
        json!({"snapshot_type": "Full", "snapshot_path": snap, "mem_file_path": mem}).to_string(),
    )
}

/// Linux cold boot running the containers' command in user space.
fn plan_linux_echo(opts: &Opts, work: &Path) -> Result<Plan, String> {
    let (kernel, initrd) = linux_artifacts(opts)?;
    let cfg = work.join("vm-linux-echo.json");
    let args = format!("{LINUX_ECHO_ARGS} flick.init=echo");
    write_vm_config(&cfg, &kernel, Some(&initrd), &args, GUEST_MEM_MIB);
    let flick = opts.flick.clone();
    let c = cfg.display().to_string();
    Ok(Plan {
        spec: Box::new(move |_| Spec {
            argv: argv(&[&flick, "--no-api", "--config-file", &c]),
            timeout: Duration::from_secs(600),
            guest_mem_kib: Some(GUEST_MEM_MIB * 1024),
            end_marker: Some("\nhi\r\n".into()),
            ..Default::default()
        }),
        after_failure: None,
        runs: opts.linux_runs,
        warmup: 0,
    })
}

/// Boots the Linux guest with `flick.init=serve`, waits until init waits for a command, and
/// snapshots it into `snap` and `mem`.
fn snapshot_waiting_linux(opts: &Opts, work: &Path, snap: &Path, mem: &Path) -> Result<(), String> {
    let (kernel, initrd) = linux_artifacts(opts)?;
    let cfg = work.join("vm-linux-serve.json");
    let args = format!("{LINUX_ECHO_ARGS} flick.init=serve");
    write_vm_config(&cfg, &kernel, Some(&initrd), &args, GUEST_MEM_MIB);
    let sock = work.join("linux-src.sock");
    let out = work.join("linux-src.out");
    let _ = std::fs::remove_file(&sock);
    let mut child = Command::new(&opts.flick)
        .arg("--api-sock")
        .arg(&sock)
        .arg("--config-file")
        .arg(&cfg)
        .stdin(Stdio::piped())
        .stdout(std::fs::File::create(&out).map_err(|e| e.to_string())?)
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start flick: {e}"))?;
    let result = (|| -> Result<(), String> {
        let t0 = Instant::now();
        while !std::fs::read_to_string(&out)
            .unwrap_or_default()
            .contains("WAITING")
        {
            if let Ok(Some(st)) = child.try_wait() {
                return Err(format!(
                    "flick exited ({st}) before init waited for a command"
                ));
            }
            if t0.elapsed() > Duration::from_secs(600) {
                return Err("init did not wait for a command within 600 s".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // Let init reach its read() on the console.
        std::thread::sleep(Duration::from_millis(500));
        pause_and_snapshot(&sock, snap, mem)
    })();
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(&sock);
    result.map_err(|e| format!("creating the Linux snapshot failed: {e}"))
}

/// Restores of a Linux guest waiting in user space, each running the containers' command.
fn plan_linux_restore_echo(
    opts: &Opts,
    work: &Path,
    r: &mut VariantResult,
) -> Result<Plan, String> {
    let snap = work.join("linux.snap");
    let mem = work.join("linux.mem");
    snapshot_waiting_linux(opts, work, &snap, &mem)?;
    let (s, m) = (snap.display().to_string(), mem.display().to_string());
    let restore = argv(&[
        &opts.flick,
        "--no-api",
        "--restore-snapshot",
        &s,
        "--restore-mem",
        &m,
        "--resume",
    ]);
    let command = format!("{ECHO_COMMAND}\n").into_bytes();
    r.notes.push(restore_burst(work, &restore, &command));
    Ok(Plan {
        spec: Box::new(move |_| Spec {
            argv: restore.clone(),
            timeout: Duration::from_secs(120),
            guest_mem_kib: Some(GUEST_MEM_MIB * 1024),
            end_marker: Some("hi\r\n".into()),
            stdin: Some(command.clone()),
            ..Default::default()
        }),
        after_failure: None,
        runs: opts.linux_runs,
        warmup: 0,
    })
}

/// Starts `RESTORE_BURST` restores at once, each fed `command`; says how long until all had
/// printed `hi` and exited cleanly. Bounded by `BURST_LIMIT`: restores still running then are
/// killed and reported as such.
fn restore_burst(work: &Path, restore: &[String], command: &[u8]) -> String {
    use std::io::Write as _;
    const BURST_LIMIT: Duration = Duration::from_secs(120);
    let t0 = Instant::now();
    let mut children = Vec::new();
    for i in 0..RESTORE_BURST {
        let out_path = work.join(format!("burst-{i}.out"));
        let out = match std::fs::File::create(&out_path) {
            Ok(f) => f,
            Err(e) => return format!("restore burst: cannot create {}: {e}", out_path.display()),
        };
        let child = Command::new(&restore[0])
            .args(&restore[1..])
            .stdin(Stdio::piped())
            .stdout(out)
            .stderr(Stdio::null())
            .spawn();
        match child {
            Ok(mut c) => {
                if let Some(mut stdin) = c.stdin.take() {
                    let _ = stdin.write_all(command);
                }
                children.push((c, out_path, None));
            }
            Err(e) => return format!("restore burst: cannot start flick: {e}"),
        }
    }
    while t0.elapsed() < BURST_LIMIT && children.iter().any(|(_, _, st)| st.is_none()) {
        for (c, _, st) in children.iter_mut().filter(|(_, _, st)| st.is_none()) {
            if let Ok(Some(status)) = c.try_wait() {
                *st = Some(status);
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let secs = t0.elapsed().as_secs_f64();
    let (mut ok, mut killed) = (0u32, 0u32);
    for (c, out_path, st) in &mut children {
        match st {
            Some(status) => {
                let said_hi =
                    std::fs::read_to_string(&*out_path).is_ok_and(|text| text.contains("hi\r\n"));
                if status.success() && said_hi {
                    ok += 1;
                }
            }
            None => {
                let _ = c.kill();
                let _ = c.wait();
                killed += 1;
            }
        }
        let _ = std::fs::remove_file(&*out_path);
    }
    if killed > 0 {
        return format!(
            "{RESTORE_BURST} restores started at once: {ok} printed `hi` and exited 0 within {} s; {killed} were still running then and were killed",
            BURST_LIMIT.as_secs()
        );
    }
    format!(
        "{RESTORE_BURST} restores started at once: {ok} printed `hi` and exited 0, all done in {secs:.2} s ({:.1} restored microVMs per second)",
        f64::from(ok) / secs
    )
}

/// A VMM serving its API with nothing configured: spawn → first successful `GET /`.
fn plan_api_ready(
    name: &str,
    bin: &str,
    work: &Path,
    runs: usize,
    warmup: usize,
    r: &mut VariantResult,
) -> Result<Plan, String> {
    r.description = format!("`{bin}` started in API mode (`--api-sock`, nothing configured): spawn → first successful `GET /` over the unix socket, then killed (a first output, where shown, is the VMM's own log line on stdout)");
    r.end_label = "API ready".into();
    r.is_vmm = true;
    if !help_text(bin).contains("--api-sock") {
        return Err(format!("{bin} has no --api-sock"));
    }
    let bin = bin.to_string();
    let sock = work.join(format!("{name}.sock"));
    let s = sock.display().to_string();
    Ok(Plan {
        spec: Box::new(move |_| Spec {
            argv: argv(&[&bin, "--api-sock", &s]),
            timeout: Duration::from_secs(30),
            // Nothing is configured, so no mapping is guest memory.
            guest_mem_kib: Some(u64::MAX),
            api_sock: Some(sock.clone()),
            api_requests: vec![ApiRequest {
                method: "GET",
                path: "/".into(),
                body: None,
                expect: None,
                timed: true,
            }],
            ..Default::default()
        }),
        after_failure: None,
        runs,
        warmup,
    })
}

/// Snapshot restore through Firecracker's API: boot the test guest in halt mode with the API
/// up, pause it, snapshot it once (with the same binary); then each run is a new process
/// loading that snapshot.
fn plan_restore(
    name: &str,
    bin: &str,
    work: &Path,
    testguest: &Path,
    runs: usize,
    warmup: usize,
    r: &mut VariantResult,
) -> Result<Plan, String> {
    r.description = format!("a new `{bin}` process (`--api-sock`) restores the test guest from a full snapshot taken by the same binary (`PUT /snapshot/load`, `resume_vm: true`): spawn → its 2xx answer; `GET /` must then say Running, and spawn → first output is the first byte on its stdout: the restored guest's first serial line for flick (which logs to stderr), its own log line for a VMM that logs to stdout (Firecracker without `--log-path`). The snapshot is taken once, of a guest paused while counting (`{RESTORE_ARGS}`, 1 vCPU, {GUEST_MEM_MIB} MiB)");
    r.end_label = "restored".into();
    r.is_vmm = true;
    if !help_text(bin).contains("--api-sock") {
        return Err(format!("{bin} has no --api-sock"));
    }
    let cfg = work.join(format!("{name}-halt.json"));
    // The guest keeps counting (a line every ms), so a restored guest shows it runs by printing.
    write_vm_config(&cfg, testguest, None, RESTORE_ARGS, GUEST_MEM_MIB);
    let sock = work.join(format!("{name}-src.sock"));
    let log = work.join(format!("{name}-src.log"));
    let snap = work.join(format!("{name}.snap"));
    let mem = work.join(format!("{name}.mem"));
    std::fs::write(&log, b"").map_err(|e| e.to_string())?;
    let _ = std::fs::remove_file(&sock);
    let mut child = Command::new(bin)
        .arg("--api-sock")
        .arg(&sock)
        .arg("--config-file")
        .arg(&cfg)
        .args(["--boot-timer", "--level", "Info", "--log-path"])
        .arg(&log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start {bin}: {e}"))?;
    let result = (|| -> Result<(), String> {
        let t0 = Instant::now();
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("Guest-boot-time") {
                break;
            }
            if let Ok(Some(st)) = child.try_wait() {
                return Err(format!("{bin} exited ({st}) before the guest booted"));
            }
            if t0.elapsed() > Duration::from_secs(10) {
                return Err("the guest did not boot within 10 s".into());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        // Let it count for a moment, then snapshot it mid-count.
        std::thread::sleep(Duration::from_millis(50));
        pause_and_snapshot(&sock, &snap, &mem)
    })();
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(&sock);
    result.map_err(|e| format!("creating the snapshot failed: {e}"))?;
    let bin = bin.to_string();
    let rsock = work.join(format!("{name}.sock"));
    let body = json!({
        "snapshot_path": snap,
        "mem_backend": {"backend_type": "File", "backend_path": mem},
        "resume_vm": true,
    })
    .to_string();
    let s = rsock.display().to_string();
    Ok(Plan {
        spec: Box::new(move |_| Spec {
            argv: argv(&[&bin, "--api-sock", &s]),
            timeout: Duration::from_secs(30),
            guest_mem_kib: Some(GUEST_MEM_MIB * 1024),
            api_sock: Some(rsock.clone()),
            api_requests: vec![
                ApiRequest {
                    method: "PUT",
                    path: "/snapshot/load".into(),
                    body: Some(body.clone()),
                    expect: None,
                    timed: true,
                },
                ApiRequest {
                    method: "GET",
                    path: "/".into(),
                    body: None,
                    expect: Some("Running".into()),
                    timed: false,
                },
            ],
            api_wait_output: true,
            ..Default::default()
        }),
        after_failure: None,
        runs,
        warmup,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `--vmm NAME=PATH` path, pointed at flick itself: the binary named by `FLICK_BIN`
    /// (scripts/test.sh passes the one its test run built), else the release build.
    #[test]
    fn vmm_variant_runs_flick() {
        let repo = flick_fixtures::repo_root();
        let flick = std::env::var_os("FLICK_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo.join("target/release/flick"));
        if !flick.is_file() {
            flick_fixtures::skip(&format!(
                "no flick binary at {} (set FLICK_BIN or build the release)",
                flick.display()
            ));
            return;
        }
        if !flick_fixtures::kvm_available() {
            return;
        }
        let guest = flick_fixtures::test_guest_dir().to_path_buf();
        let opts = Opts {
            runs: 2,
            linux_runs: 1,
            warmup: 1,
            vmms: vec![("flick2".into(), flick.display().to_string())],
            only: Some(vec![
                "flick2".into(),
                "flick2-api-ready".into(),
                "flick2-restore".into(),
            ]),
            with_linux: false,
            repo,
            flick: flick.display().to_string(),
            guest_dir: guest,
            busybox: "/bin/busybox".into(),
            smaps: true,
            verbose: false,
            settle: Duration::from_secs(0),
        };
        let r = run_all(&opts);
        assert_eq!(r.len(), 3);
        for v in &r {
            assert!(v.skipped.is_none(), "{}: {:?}", v.name, v.skipped);
            assert_eq!(v.runs.len(), 2, "{}", v.name);
            assert!(v.failures.is_empty(), "{}: {:?}", v.name, v.failures);
        }
        assert!(r[0].runs.iter().all(|o| o.boot_timer_ms.is_some()));
        assert!(r[0].command.contains("--log-path"));
        // The API variants ran that binary and timed their request.
        for v in &r[1..] {
            assert!(
                v.command.contains(&flick.display().to_string()),
                "{}",
                v.command
            );
            assert!(v.runs.iter().all(|o| o.ok), "{}", v.name);
        }
    }
}
