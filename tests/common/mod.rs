//! Shared fixtures for integration tests: the test guests, a `TestVm` that runs the real `flick`
//! binary with a config file, and the KVM availability rule (required in CI, skippable elsewhere).

#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Longest a test VM may run before the test fails (it is killed, never left hanging).
pub const VM_TIMEOUT: Duration = Duration::from_secs(30);

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn flick_bin() -> &'static str {
    env!("CARGO_BIN_EXE_flick")
}

/// True when KVM is usable. Without it: a failure under CI, a skip (with a message) elsewhere.
pub fn kvm_available() -> bool {
    if Path::new("/dev/kvm").exists() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("/dev/kvm is missing: KVM tests cannot be skipped in CI");
    }
    eprintln!("skipping: /dev/kvm is missing on this host");
    false
}

/// A private temporary directory, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("flick-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    pub fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, bytes).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Builds the test guests once per test binary (make is incremental; a file lock serialises
/// concurrent test binaries) and returns the output directory.
pub fn test_guest_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let out = repo_root().join("target/test-guest");
        std::fs::create_dir_all(&out).unwrap();
        let lock = std::fs::File::create(out.join(".lock")).unwrap();
        // SAFETY: flock on an fd we own; released when `lock` is dropped.
        unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
        let status = Command::new("make")
            .arg("-s")
            .arg("-C")
            .arg(repo_root().join("resources/guest/test-guest"))
            .arg(format!("OUT={}", out.display()))
            .status()
            .expect("run make for the test guests");
        assert!(status.success(), "building the test guests failed");
        out
    })
}

/// The 64-bit Linux boot protocol test guest.
pub fn test_guest() -> PathBuf {
    test_guest_dir().join("testguest.elf")
}

/// The PVH test guest.
pub fn test_guest_pvh() -> PathBuf {
    test_guest_dir().join("testguest-pvh.elf")
}

/// What a finished VM printed and how it ended.
#[derive(Debug)]
pub struct Outcome {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Outcome {
    pub fn line_starting(&self, prefix: &str) -> Option<&str> {
        self.stdout.lines().find(|l| l.starts_with(prefix))
    }

    pub fn assert_clean_exit(&self) {
        assert_eq!(self.code, Some(0), "flick failed: {self:#?}");
        assert!(
            self.stdout.contains("testguest: done"),
            "guest did not finish: {self:#?}"
        );
    }
}

/// Runs `flick --no-api --config-file` with the given config JSON and extra args; feeds `stdin`.
pub fn run_config(config: &serde_json::Value, args: &[&str], stdin: &[u8]) -> Outcome {
    let dir = TempDir::new("vm");
    let path = dir.write("vm.json", config.to_string().as_bytes());
    let mut cmd = Command::new(flick_bin());
    cmd.arg("--no-api")
        .arg("--config-file")
        .arg(&path)
        .args(args);
    run_command(cmd, stdin)
}

/// Runs a command to completion with a timeout, capturing its output.
pub fn run_command(mut cmd: Command, stdin: &[u8]) -> Outcome {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn flick");
    let mut input = child.stdin.take().unwrap();
    let data = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&data);
        // Keep stdin open briefly so a guest can still be reading it, then close it.
        std::thread::sleep(Duration::from_millis(50));
    });
    let code = wait_with_timeout(&mut child, VM_TIMEOUT);
    let _ = writer.join();
    let mut stdout = String::new();
    let mut stderr = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    // Serial consoles end lines with CRLF; tests match on plain lines.
    let stdout = stdout.replace("\r\n", "\n");
    Outcome {
        code,
        stdout,
        stderr,
        elapsed: start.elapsed(),
    }
}

/// Waits for `child`; kills it and fails the test after `timeout`.
pub fn wait_with_timeout(child: &mut Child, timeout: Duration) -> Option<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("flick did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A config for a test guest.
pub fn guest_config(
    kernel: &Path,
    boot_args: &str,
    vcpus: u8,
    mem_mib: usize,
) -> serde_json::Value {
    serde_json::json!({
        "boot-source": {"kernel_image_path": kernel, "boot_args": boot_args},
        "machine-config": {"vcpu_count": vcpus, "mem_size_mib": mem_mib}
    })
}

/// One HTTP request over the API socket; returns status and body.
pub fn api_call(sock: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    use std::io::BufRead;
    let mut stream = std::os::unix::net::UnixStream::connect(sock).expect("connect to the API");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let body = body.unwrap_or("");
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut reader = std::io::BufReader::new(stream);
    let mut status_line = String::new();
    reader.read_line(&mut status_line).unwrap();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut rest = String::new();
    let _ = reader.read_to_string(&mut rest);
    let body = rest
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Waits until `sock` accepts connections.
pub fn wait_for_socket(sock: &Path) {
    let start = Instant::now();
    while std::os::unix::net::UnixStream::connect(sock).is_err() {
        assert!(
            start.elapsed() < VM_TIMEOUT,
            "API socket {} never came up",
            sock.display()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Polls `file` until it contains `needle`.
pub fn wait_for_text(file: &Path, needle: &str) -> String {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        assert!(
            start.elapsed() < VM_TIMEOUT,
            "{needle:?} never appeared in {}: {text}",
            file.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}
