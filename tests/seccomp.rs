//! seccomp end to end: every thread of a running flick is filtered by default, `--no-seccomp`
//! leaves them all unfiltered, a filter file given with `--seccomp-filter` replaces the built-in
//! programs (a call it forbids kills the process with SIGSYS), and a bad file is a one-line
//! error. Tests that boot the test guest need /dev/kvm (a skip, or a failure under CI).

mod common;

use std::collections::BTreeMap;
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// `BPF_LD | BPF_W | BPF_ABS`, `BPF_JMP | BPF_JEQ | BPF_K`, `BPF_RET | BPF_K`.
const LD_ABS: u16 = 0x20;
const JEQ: u16 = 0x15;
const RET: u16 = 0x06;
const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
const SECCOMP_RET_KILL_PROCESS: u32 = 0x8000_0000;
const SYS_IOCTL: u32 = 16;
const SECCOMP_RET_TRAP: u32 = 0x0003_0000;
const SYS_WRITE: u32 = 1;

/// One BPF instruction: code, jump if true, jump if false, operand.
type Instruction = (u16, u8, u8, u32);

/// A filter file: thread name → program of `(code, jt, jf, k)` instructions, serialized as
/// Firecracker's seccompiler-bin does (bincode, fixed-width little-endian integers).
fn filter_file(programs: &[(&str, Vec<Instruction>)]) -> Vec<u8> {
    let mut out = (programs.len() as u64).to_le_bytes().to_vec();
    for (name, program) in programs {
        out.extend_from_slice(&(name.len() as u64).to_le_bytes());
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&(program.len() as u64).to_le_bytes());
        for &(code, jt, jf, k) in program {
            out.extend_from_slice(&code.to_le_bytes());
            out.extend_from_slice(&[jt, jf]);
            out.extend_from_slice(&k.to_le_bytes());
        }
    }
    out
}

fn allow_all() -> Vec<Instruction> {
    vec![(RET, 0, 0, SECCOMP_RET_ALLOW)]
}

/// Kills the process on `write(2)`, allows everything else (a test program: real filters also
/// check the architecture first).
fn kill_on_write() -> Vec<Instruction> {
    vec![
        (LD_ABS, 0, 0, 0), // the system call number
        (JEQ, 0, 1, SYS_WRITE),
        (RET, 0, 0, SECCOMP_RET_KILL_PROCESS),
        (RET, 0, 0, SECCOMP_RET_ALLOW),
    ]
}

/// Traps `ioctl(2)` (SIGSYS to the thread), allows everything else.
fn trap_on_ioctl() -> Vec<Instruction> {
    vec![
        (LD_ABS, 0, 0, 0),
        (JEQ, 0, 1, SYS_IOCTL),
        (RET, 0, 0, SECCOMP_RET_TRAP),
        (RET, 0, 0, SECCOMP_RET_ALLOW),
    ]
}

/// A flick serving its API with the test guest booted from a config file (two vCPUs counting
/// on the console); killed on drop.
struct Running {
    child: Child,
    dir: TempDir,
    sock: PathBuf,
}

impl Running {
    fn start(args: &[&str]) -> Running {
        let dir = TempDir::new("seccomp");
        let config = serde_json::json!({
            "boot-source": {
                "kernel_image_path": test_guest(),
                "boot_args": "tg.count=1000000 tg.delay_ms=2 tg.exit=halt",
            },
            "machine-config": {"vcpu_count": 2, "mem_size_mib": 64},
        });
        let config = dir.write("vm.json", config.to_string().as_bytes());
        let sock = dir.path("api.sock");
        let child = Command::new(flick_bin())
            .arg("--api-sock")
            .arg(&sock)
            .arg("--config-file")
            .arg(&config)
            .args(args)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.path("stdout")).unwrap())
            .stderr(std::fs::File::create(dir.path("stderr")).unwrap())
            .spawn()
            .unwrap();
        let running = Running { child, dir, sock };
        wait_for_socket(&running.sock);
        wait_for_text(&running.dir.path("stdout"), "count: 3\n");
        running
    }

    /// `Seccomp:` of each thread, by thread id, with the thread's name.
    fn seccomp_modes(&self) -> BTreeMap<u32, (String, String)> {
        let tasks = format!("/proc/{}/task", self.child.id());
        let mut modes = BTreeMap::new();
        for entry in std::fs::read_dir(&tasks).unwrap() {
            let path = entry.unwrap().path();
            let tid = path.file_name().unwrap().to_str().unwrap().parse().unwrap();
            let Ok(status) = std::fs::read_to_string(path.join("status")) else {
                continue; // the thread ended meanwhile
            };
            let field = |name: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(|v| v.trim().to_string())
                    .unwrap_or_default()
            };
            modes.insert(tid, (field("Name:"), field("Seccomp:")));
        }
        modes
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The thread names present, each once.
fn names(modes: &BTreeMap<u32, (String, String)>) -> Vec<&str> {
    let mut names: Vec<&str> = modes.values().map(|(n, _)| n.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    names
}

/// Holds an API connection open (its thread waits for a request) while the threads are read.
fn open_connection(sock: &Path) -> UnixStream {
    let stream = UnixStream::connect(sock).unwrap();
    // The acceptor starts the connection's thread right after accept; give it a moment.
    thread::sleep(Duration::from_millis(50));
    stream
}

#[test]
fn every_thread_of_a_running_flick_is_filtered() {
    if !kvm_available() {
        return;
    }
    let flick = Running::start(&[]);
    let _connection = open_connection(&flick.sock);
    let modes = flick.seccomp_modes();
    // KVM may add a kernel worker to the process (`kvm-nx-lpage-recovery`); it counts too.
    let names = names(&modes);
    let expected = [
        "flick",
        "flick_api",
        "flick_api_conn",
        "flick_vcpu0",
        "flick_vcpu1",
    ];
    let mut others = names.iter().filter(|n| !expected.contains(n));
    assert!(
        expected.iter().all(|n| names.contains(n)) && others.all(|n| n.starts_with("kvm-")),
        "{modes:?}"
    );
    for (tid, (name, mode)) in &modes {
        assert_eq!(
            mode, "2",
            "thread {tid} ({name}) is not filtered: {modes:?}"
        );
    }
    // Filtered threads still do their work: the API answers, the guest keeps counting.
    let (status, body) = api_call(&flick.sock, "GET", "/", None);
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("Running"), "{body}");
}

#[test]
fn no_seccomp_leaves_every_thread_unfiltered() {
    if !kvm_available() {
        return;
    }
    let flick = Running::start(&["--no-seccomp"]);
    let _connection = open_connection(&flick.sock);
    let modes = flick.seccomp_modes();
    assert!(names(&modes).contains(&"flick_vcpu1"), "{modes:?}");
    for (tid, (name, mode)) in &modes {
        assert_eq!(mode, "0", "thread {tid} ({name}) is filtered: {modes:?}");
    }
}

fn wait_status(child: &mut Child) -> ExitStatus {
    let deadline = Instant::now() + VM_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("flick did not exit within {VM_TIMEOUT:?}");
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// Boots the test guest (`tg.exit=halt`) from a config file with a filter file whose vCPU
/// program is `vcpu` (the VMM and API threads unfiltered) and `extra` arguments; waits for flick
/// to end and returns how, with its stderr.
fn run_with_vcpu_program(
    dir: &TempDir,
    vcpu: Vec<Instruction>,
    extra: &[&std::ffi::OsStr],
) -> (ExitStatus, String) {
    let filter = dir.write(
        "filter.bpf",
        &filter_file(&[("vmm", allow_all()), ("api", allow_all()), ("vcpu", vcpu)]),
    );
    let config = guest_config(&test_guest(), "tg.exit=halt", 1, 64);
    let config = dir.write("vm.json", config.to_string().as_bytes());
    let mut child = Command::new(flick_bin())
        .args(["--no-api", "--config-file"])
        .arg(&config)
        .arg("--seccomp-filter")
        .arg(&filter)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr_pipe = child.stderr.take().unwrap();
    let reader = thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr_pipe, &mut text);
        text
    });
    let status = wait_status(&mut child);
    (status, reader.join().unwrap())
}

#[test]
fn a_call_the_filter_forbids_kills_flick_with_sigsys() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("seccomp-kill");
    // The vCPU thread may not write: the guest's first console byte is the forbidden call.
    let (status, _) = run_with_vcpu_program(&dir, kill_on_write(), &[]);
    assert_eq!(status.signal(), Some(libc::SIGSYS), "{status:?}");

    // The same filter file with a vCPU program that allows write boots normally: the kill came
    // from the forbidden call, not from the file.
    let allowing = dir.write(
        "allow.bpf",
        &filter_file(&[
            ("vmm", allow_all()),
            ("api", allow_all()),
            ("vcpu", allow_all()),
            ("teardown", allow_all()),
        ]),
    );
    let out = run_config(
        &guest_config(&test_guest(), "tg.smp=0", 1, 64),
        &["--seccomp-filter", allowing.to_str().unwrap()],
        b"",
    );
    out.assert_clean_exit();
}

#[test]
fn a_trapped_call_is_reported_with_its_number_and_thread_and_exit_code_148() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("seccomp-trap");
    let log = dir.path("flick.log");
    // The vCPU thread's first KVM_RUN is the trapped call.
    let (status, stderr) = run_with_vcpu_program(
        &dir,
        trap_on_ioctl(),
        &["--log-path".as_ref(), log.as_os_str()],
    );
    assert_eq!(status.code(), Some(148), "{status:?} {stderr}");
    // The line names the call, its first two arguments (the vCPU's fd and KVM_RUN, 0xae80)
    // and the thread.
    let line = stderr.lines().next().unwrap_or_default();
    let expected_start =
        format!("flick: error: seccomp: forbidden system call {SYS_IOCTL} (arguments 0x");
    let expected_end = ", 0xae80, ...; thread flick_vcpu0); stopped by the thread's filter, \
                        see docs/security.md";
    assert!(
        line.starts_with(&expected_start) && line.ends_with(expected_end),
        "{stderr}"
    );
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains(line),
        "the log file has the report too: {logged}"
    );
}

#[test]
fn built_in_filters_trap_so_that_a_forbidden_call_is_reported() {
    for (arch, text) in [
        ("x86_64", include_str!("../resources/seccomp/x86_64.json")),
        ("aarch64", include_str!("../resources/seccomp/aarch64.json")),
    ] {
        let policy: serde_json::Value = serde_json::from_str(text).unwrap();
        built_in_policy_traps(arch, &policy);
    }
}

fn built_in_policy_traps(arch: &str, policy: &serde_json::Value) {
    for role in ["vmm", "api", "vcpu"] {
        assert_eq!(policy[role]["mismatch_action"], "trap", "{arch} {role}");
        let calls: Vec<&str> = policy[role]["filter"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|rule| rule["syscall"].as_str())
            .collect();
        // What the SIGSYS handler itself needs.
        for needed in ["write", "exit_group", "rt_sigreturn"] {
            assert!(calls.contains(&needed), "{arch} {role} lacks {needed}");
        }
    }
}

#[test]
fn a_bad_filter_file_is_a_one_line_error() {
    let dir = TempDir::new("seccomp-bad");
    let config = dir.write(
        "vm.json",
        guest_config(Path::new("/nonexistent"), "", 1, 64)
            .to_string()
            .as_bytes(),
    );
    let garbage = dir.write("garbage.bpf", b"not a filter file");
    let partial = dir.write("partial.bpf", &filter_file(&[("vmm", allow_all())]));
    let missing = dir.path("missing.bpf");
    for (file, needle) in [
        (&garbage, "invalid seccomp filter file"),
        (&partial, "no entry for thread api, vcpu"),
        (&missing, "cannot read seccomp filter file"),
    ] {
        let mut cmd = Command::new(flick_bin());
        cmd.args(["--no-api", "--config-file"])
            .arg(&config)
            .arg("--seccomp-filter")
            .arg(file);
        let out = run_command(cmd, b"");
        assert_eq!(out.code, Some(1), "{out:#?}");
        assert_one_line_error(&out, needle);
    }
}
