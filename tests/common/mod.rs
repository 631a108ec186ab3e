//! Fixtures for the integration tests: the shared fixture crate (`tests/fixtures`: HTTP client,
//! test-guest builder, skip rule, temporary directories) plus what needs the path of the `flick`
//! binary, which only flick's own test targets know: `run_config` and friends that run the real
//! binary, and network namespaces for virtio-net tests.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

// Each test binary uses its own part of these.
#[allow(unused_imports)]
pub use flick_fixtures::http;
#[allow(unused_imports)]
pub use flick_fixtures::{
    known_issue, kvm_available, not_run_without, repo_root, skip, test_guest, test_guest_dir,
    test_guest_pvh, tool_available, TempDir,
};

/// Longest a test VM may run, or a test may wait for one, before the test fails (the VM is
/// killed, never left hanging). A hang detector, not a performance bound.
pub const VM_TIMEOUT: Duration = Duration::from_secs(30);

pub fn flick_bin() -> &'static str {
    env!("CARGO_BIN_EXE_flick")
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
    http::request(sock, method, path, body)
        .unwrap_or_else(|e| panic!("{method} {path} on {}: {e}", sock.display()))
}

/// Waits until `sock` accepts connections.
pub fn wait_for_socket(sock: &Path) {
    http::wait_for_socket(sock, VM_TIMEOUT);
}

/// Polls `file` until it contains `needle` and the line holding it is complete.
pub fn wait_for_text(file: &Path, needle: &str) -> String {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        // Only once the line holding the needle is complete: the writer may be mid-line, and
        // callers go on to read the rest of that line.
        if let Some(at) = text.find(needle) {
            if text[at + needle.len()..].contains('\n') || needle.ends_with('\n') {
                return text;
            }
        }
        assert!(
            start.elapsed() < VM_TIMEOUT,
            "{needle:?} never appeared in {}: {text}",
            file.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A flick started with `--api-sock` in its own temporary directory, its serial output in a
/// file; killed and reaped on drop.
pub struct ApiFlick {
    pub dir: TempDir,
    pub sock: std::path::PathBuf,
    pub stdout: std::path::PathBuf,
    pub child: Child,
}

impl ApiFlick {
    /// Starts flick and waits until its socket accepts connections.
    pub fn start(tag: &str) -> ApiFlick {
        let dir = TempDir::new(tag);
        let sock = dir.path("api.sock");
        let stdout = dir.path("out");
        let child = Command::new(flick_bin())
            .arg("--api-sock")
            .arg(&sock)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_for_socket(&sock);
        ApiFlick {
            dir,
            sock,
            stdout,
            child,
        }
    }

    /// One request; returns status and body.
    pub fn call(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        api_call(&self.sock, method, path, body)
    }

    /// `PUT`s each `(path, body)` and requires 204 for each.
    pub fn put_all(&self, calls: &[(&str, serde_json::Value)]) {
        for (path, body) in calls {
            let (status, answer) = self.call("PUT", path, Some(&body.to_string()));
            assert_eq!(status, 204, "{path}: {answer}");
        }
    }
}

impl Drop for ApiFlick {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A private network namespace with one TAP device (host side `10.0.N.1/24`), removed on drop,
/// along with any helper processes started in it.
pub struct NetNs {
    pub name: String,
    pub tap: String,
    pub host_ip: String,
    pub guest_ip: String,
    children: Vec<Child>,
}

impl NetNs {
    /// Creates namespace `flk<pid><tag>` holding TAP `tap0`. `subnet` picks 10.0.<subnet>.0/24.
    pub fn new(tag: &str, subnet: u8) -> NetNs {
        NetNs::with_tap_user(tag, subnet, None)
    }

    /// As [`NetNs::new`], with the TAP owned by `user` (a uid), so that a process running as
    /// that user without privileges can attach to it (e.g. flick under a jailer).
    pub fn with_tap_user(tag: &str, subnet: u8, user: Option<u32>) -> NetNs {
        let name = format!("flk{}{tag}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        let ns = NetNs {
            name: name.clone(),
            tap: "tap0".into(),
            host_ip: format!("10.0.{subnet}.1"),
            guest_ip: format!("10.0.{subnet}.2"),
            children: Vec::new(),
        };
        ns.ip(&["netns", "add", &name]);
        let owner = user.map(|uid| uid.to_string());
        let mut add = vec!["ip", "tuntap", "add", "tap0", "mode", "tap"];
        if let Some(uid) = &owner {
            add.extend(["user", uid.as_str()]);
        }
        ns.exec_ok(&add);
        ns.exec_ok(&[
            "ip",
            "addr",
            "add",
            &format!("{}/24", ns.host_ip),
            "dev",
            "tap0",
        ]);
        ns.exec_ok(&["ip", "link", "set", "tap0", "up"]);
        ns.exec_ok(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    fn ip(&self, args: &[&str]) {
        let status = Command::new("ip").args(args).status().expect("run ip");
        assert!(status.success(), "ip {args:?} failed");
    }

    /// Runs a command inside the namespace and requires success.
    pub fn exec_ok(&self, args: &[&str]) {
        let status = self.command(args).status().expect("run ip netns exec");
        assert!(status.success(), "{args:?} in {} failed", self.name);
    }

    /// A command that runs inside the namespace.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).args(args);
        cmd
    }

    /// Starts a background process in the namespace; it is killed on drop.
    pub fn spawn(&mut self, args: &[&str], log: &Path) -> &mut Child {
        let child = self
            .command(args)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(log).unwrap())
            .stderr(Stdio::from(
                std::fs::File::create(log.with_extension("err")).unwrap(),
            ))
            .spawn()
            .expect("spawn in namespace");
        self.children.push(child);
        self.children.last_mut().unwrap()
    }

    /// Serves DHCP on the TAP, handing out the guest address.
    pub fn start_dhcp(&mut self, log: &Path) {
        let range = format!("{},{},255.255.255.0,1h", self.guest_ip, self.guest_ip);
        let iface = format!("--interface={}", self.tap);
        let range_arg = format!("--dhcp-range={range}");
        // dnsmasq unlinks and recreates its PID file: it must never be a shared path such as
        // /dev/null (that would replace the host's /dev/null with a regular file).
        let pid_arg = format!("--pid-file={}", log.with_extension("pid").display());
        let args = [
            "dnsmasq",
            "--no-daemon",
            "--bind-interfaces",
            &iface,
            &range_arg,
            "--no-resolv",
            "--no-hosts",
            "--leasefile-ro",
            "--log-dhcp",
            "--port=0",
            &pid_arg,
        ];
        self.spawn(&args, log);
    }

    /// A UDP socket bound inside the namespace (the calling thread enters it briefly).
    pub fn udp_socket(&self, port: u16) -> std::net::UdpSocket {
        let name = self.name.clone();
        let addr = format!("{}:{port}", self.host_ip);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(format!("/var/run/netns/{name}")).expect("open netns");
            // SAFETY: setns on this short-lived thread only; the fd is valid.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns failed");
            std::net::UdpSocket::bind(addr).expect("bind UDP in the namespace")
        })
        .join()
        .unwrap()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Whether network-namespace tests can run here (`ip` and root).
pub fn netns_available() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let ip = Command::new("ip").arg("-V").output().is_ok();
    if root && ip {
        return true;
    }
    skip("network namespace tests need root and iproute2");
    false
}

/// Asserts flick failed with exactly one `flick: error:` line containing `needle`, no panic.
pub fn assert_one_line_error(out: &Outcome, needle: &str) {
    assert_ne!(out.code, Some(0), "{out:#?}");
    assert!(out.code.is_some(), "killed by a signal: {out:#?}");
    assert!(!out.stderr.contains("panicked"), "{out:#?}");
    let errors: Vec<_> = out
        .stderr
        .lines()
        .filter(|l| l.starts_with("flick: error:"))
        .collect();
    assert_eq!(errors.len(), 1, "{out:#?}");
    assert!(
        errors[0].contains(needle),
        "expected {needle:?} in {:?}",
        errors[0]
    );
}
