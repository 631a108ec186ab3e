//! The HTTP API end to end: the real `flick` binary on a unix socket in a temporary directory,
//! driven with `curl --unix-socket` and with the fixtures' HTTP client.
//!
//! Tests that boot the test guest need /dev/kvm, and the curl tests need curl (scripts/test.sh
//! installs it); without them they fail when `CI` is set and are skipped with a `[SKIP]` line
//! otherwise.

mod common;

use std::io::{BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::http::{read_response, Connection};
use common::*;

const FLICK: &str = env!("CARGO_BIN_EXE_flick");

fn kvm_missing() -> bool {
    !kvm_available()
}

/// Whether `curl` is missing (a skip, or a failure under CI); scripts/test.sh installs it.
fn curl_missing() -> bool {
    !tool_available("curl", "curl")
}

/// A running `flick --api-sock DIR/api.sock`; killed and cleaned up on drop.
struct Flick {
    child: Child,
    dir: TempDir,
    sock: PathBuf,
}

impl Flick {
    fn spawn(args: &[&str]) -> Flick {
        Flick::spawn_in(TempDir::new("api"), args)
    }

    fn spawn_in(dir: TempDir, args: &[&str]) -> Flick {
        let sock = dir.path("api.sock");
        let child = Command::new(FLICK)
            .arg("--api-sock")
            .arg(&sock)
            .args(args)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.path("stdout")).unwrap())
            .stderr(std::fs::File::create(dir.path("stderr")).unwrap())
            .spawn()
            .unwrap();
        let flick = Flick { child, dir, sock };
        flick.wait_ready();
        flick
    }

    fn wait_ready(&self) {
        let start = Instant::now();
        while UnixStream::connect(&self.sock).is_err() {
            assert!(
                start.elapsed() < VM_TIMEOUT,
                "flick did not listen on {}; stderr: {}",
                self.sock.display(),
                self.stderr()
            );
            thread::sleep(Duration::from_millis(2));
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path("stderr")).unwrap_or_default()
    }

    fn stdout(&self) -> String {
        std::fs::read_to_string(self.dir.path("stdout")).unwrap_or_default()
    }

    /// Waits until the guest's console output contains `needle`.
    fn wait_for_output(&self, needle: &str) {
        wait_for_text(&self.dir.path("stdout"), needle);
    }

    fn wait_exit(&mut self) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(start.elapsed() < VM_TIMEOUT, "flick did not exit");
            thread::sleep(Duration::from_millis(5));
        }
    }

    fn request(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        api_call(&self.sock, method, path, body)
    }

    fn curl(&self, args: &[&str]) -> Output {
        Command::new("curl")
            .args(["-sS", "--max-time", "10", "--unix-socket"])
            .arg(&self.sock)
            .args(args)
            .output()
            .unwrap()
    }

    /// `curl -X method http://localhost{path} [-d body]`: status code and body.
    fn curl_call(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        let url = format!("http://localhost{path}");
        let mut args = vec!["-X", method, "-w", "\n%{http_code}", url.as_str()];
        if let Some(body) = body {
            args.extend(["-H", "Content-Type: application/json", "-d", body]);
        }
        let out = self.curl(&args);
        assert!(out.status.success(), "curl failed: {out:?}");
        let text = String::from_utf8(out.stdout).unwrap();
        let (body, code) = text.rsplit_once('\n').unwrap();
        (code.parse().unwrap(), body.to_string())
    }

    fn state(&self) -> String {
        let (status, body) = self.request("GET", "/", None);
        assert_eq!(status, 200, "{body}");
        let info: serde_json::Value = serde_json::from_str(&body).unwrap();
        info["state"].as_str().unwrap().to_string()
    }

    /// Configures the test guest through the API (Firecracker's getting-started sequence) and
    /// starts it.
    fn boot(&self, kernel: &Path, boot_args: &str) {
        let boot = serde_json::json!({
            "kernel_image_path": kernel,
            "boot_args": boot_args,
        });
        for (method, path, body) in [
            ("PUT", "/boot-source", boot.to_string()),
            (
                "PUT",
                "/machine-config",
                r#"{"vcpu_count": 1, "mem_size_mib": 128}"#.to_string(),
            ),
            (
                "PUT",
                "/actions",
                r#"{"action_type": "InstanceStart"}"#.to_string(),
            ),
        ] {
            let (status, answer) = self.curl_call(method, path, Some(&body));
            assert_eq!(status, 204, "{method} {path}: {answer}");
        }
    }
}

impl Drop for Flick {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn fault_message(body: &str) -> String {
    let value: serde_json::Value = serde_json::from_str(body).unwrap();
    value["fault_message"].as_str().unwrap().to_string()
}

#[test]
fn get_root_over_curl_reports_not_started() {
    if curl_missing() {
        return;
    }
    let flick = Flick::spawn(&[]);
    let (status, body) = flick.curl_call("GET", "/", None);
    let info: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status, 200);
    assert_eq!(info["state"], "Not started");
    assert_eq!(info["id"], "anonymous-instance");
    // The Firecracker API version served, as a semantic version clients can compare, and
    // flick's own version beside it.
    let api_version = info["vmm_version"].as_str().unwrap();
    let parts: Vec<u32> = api_version.split('.').map(|p| p.parse().unwrap()).collect();
    assert!(parts.len() == 3 && parts[0] >= 1, "{body}");
    assert_eq!(info["flick_version"], env!("CARGO_PKG_VERSION"), "{body}");
    let (status, body) = flick.curl_call("GET", "/version", None);
    assert_eq!(status, 200);
    let version: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(version["firecracker_version"], api_version, "{body}");
}

#[test]
fn getting_started_sequence_boots_the_guest() {
    if curl_missing() || kvm_missing() {
        return;
    }
    let guest = test_guest();
    let flick = Flick::spawn(&[]);
    flick.boot(&guest, "console=ttyS0 tg.exit=halt");
    assert_eq!(flick.state(), "Running");
    flick.wait_for_output("testguest: done");
    assert_eq!(flick.state(), "Running");
}

#[test]
fn pre_boot_calls_after_boot_are_refused() {
    if curl_missing() || kvm_missing() {
        return;
    }
    let guest = test_guest();
    let flick = Flick::spawn(&[]);
    flick.boot(&guest, "tg.exit=halt");
    for (path, body) in [
        (
            "/machine-config",
            r#"{"vcpu_count": 2, "mem_size_mib": 256}"#,
        ),
        ("/boot-source", r#"{"kernel_image_path": "/k"}"#),
        (
            "/drives/rootfs",
            r#"{"drive_id": "rootfs", "path_on_host": "/r", "is_root_device": true, "is_read_only": true}"#,
        ),
        ("/actions", r#"{"action_type": "InstanceStart"}"#),
    ] {
        let (status, answer) = flick.request("PUT", path, Some(body));
        assert_eq!(status, 400, "PUT {path}: {answer}");
        assert!(!fault_message(&answer).is_empty());
    }
    assert_eq!(flick.state(), "Running");
}

#[test]
fn runtime_calls_before_boot_are_refused() {
    let flick = Flick::spawn(&[]);
    for (method, path, body) in [
        ("PATCH", "/vm", r#"{"state": "Paused"}"#),
        ("PUT", "/actions", r#"{"action_type": "SendCtrlAltDel"}"#),
        ("PUT", "/actions", r#"{"action_type": "FlushMetrics"}"#),
        ("PATCH", "/drives/rootfs", r#"{"drive_id": "rootfs"}"#),
    ] {
        let (status, answer) = flick.request(method, path, Some(body));
        assert_eq!(status, 400, "{method} {path}: {answer}");
        assert!(
            fault_message(&answer).contains("after the VM starts"),
            "{answer}"
        );
    }
    assert_eq!(flick.state(), "Not started");
}

#[test]
fn existing_socket_path_makes_flick_exit_with_one_line_error() {
    let dir = TempDir::new("api-exists");
    let sock = dir.write("api.sock", b"");
    let out = Command::new(FLICK)
        .arg("--api-sock")
        .arg(&sock)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        stderr,
        format!(
            "flick: error: socket path {} already exists\n",
            sock.display()
        )
    );
    assert!(sock.exists(), "the existing file must be left alone");
}

#[test]
fn socket_is_removed_when_the_guest_resets() {
    if curl_missing() || kvm_missing() {
        return;
    }
    let guest = test_guest();
    let mut flick = Flick::spawn(&[]);
    flick.boot(&guest, "tg.exit=reboot");
    let status = flick.wait_exit();
    assert_eq!(status.code(), Some(0), "stderr: {}", flick.stderr());
    assert!(!flick.sock.exists());
}

#[test]
fn socket_is_removed_on_sigterm() {
    let mut flick = Flick::spawn(&[]);
    // SAFETY: sends a signal to a child process this test owns.
    let rc = unsafe { libc::kill(flick.child.id().cast_signed(), libc::SIGTERM) };
    assert_eq!(rc, 0);
    let status = flick.wait_exit();
    assert!(!status.success());
    assert!(!flick.sock.exists());
}

#[test]
fn socket_is_removed_when_a_config_error_ends_flick() {
    let dir = TempDir::new("api-config-error");
    let config = dir.write(
        "vm.json",
        br#"{"boot-source": {"kernel_image_path": "/no/such/kernel"}}"#,
    );
    let sock = dir.path("api.sock");
    let out = Command::new(FLICK)
        .arg("--api-sock")
        .arg(&sock)
        .arg("--config-file")
        .arg(&config)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(!sock.exists());
}

#[test]
fn config_file_with_api_boots_and_keeps_serving() {
    if kvm_missing() {
        return;
    }
    let guest = test_guest();
    let dir = TempDir::new("api-config");
    let text = serde_json::json!({
        "boot-source": {"kernel_image_path": guest, "boot_args": "tg.exit=halt"},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 64},
    });
    let config = dir.write("vm.json", text.to_string().as_bytes());
    let config = config.to_str().unwrap().to_string();
    let flick = Flick::spawn_in(dir, &["--config-file", &config]);
    assert_eq!(flick.state(), "Running");
    let (status, body) = flick.request("GET", "/machine-config", None);
    assert_eq!(status, 200);
    assert!(body.contains("\"mem_size_mib\":64"), "{body}");
}

// The next two tests prove concurrency by order, not by time: the second client is answered
// while the first one's connection is still open and waiting, and the first one is served
// afterwards on that same connection, so the server neither waited for it nor dropped it.

#[test]
fn silent_client_does_not_block_another() {
    let flick = Flick::spawn(&[]);
    let mut silent = Connection::open(&flick.sock).unwrap();
    let (status, _) = flick.request("GET", "/", None);
    assert_eq!(status, 200);
    let (status, _) = silent.call("GET", "/", None).unwrap();
    assert_eq!(status, 200, "the silent client was dropped");
}

#[test]
fn half_request_does_not_block_another() {
    let flick = Flick::spawn(&[]);
    let mut half = Connection::open(&flick.sock).unwrap();
    half.send_raw(b"PUT /machine-config HTTP/1.1\r\nContent-Len")
        .unwrap();
    let (status, _) = flick.request("GET", "/version", None);
    assert_eq!(status, 200);
    let body = r#"{"vcpu_count": 1, "mem_size_mib": 96}"#;
    let rest = format!("gth: {}\r\n\r\n{body}", body.len());
    half.send_raw(rest.as_bytes()).unwrap();
    let (status, answer) = half.receive().unwrap();
    assert_eq!(status, 204, "the half request was dropped: {answer}");
    let (_, config) = flick.request("GET", "/machine-config", None);
    assert!(config.contains("\"mem_size_mib\":96"), "{config}");
}

#[test]
fn fifty_concurrent_clients_all_get_answers() {
    let flick = Flick::spawn(&[]);
    let sock = flick.sock.clone();
    let clients: Vec<_> = (0..50)
        .map(|_| {
            let sock = sock.clone();
            thread::spawn(move || http::request(&sock, "GET", "/", None).unwrap().0)
        })
        .collect();
    let statuses: Vec<u16> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    assert_eq!(statuses, vec![200; 50]);
}

#[test]
fn client_disconnecting_mid_request_leaves_the_server_serving() {
    let flick = Flick::spawn(&[]);
    for partial in [
        &b"PUT /machine-config HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"vcpu"[..],
        b"GET / HT",
    ] {
        let mut stream = UnixStream::connect(&flick.sock).unwrap();
        stream.write_all(partial).unwrap();
        drop(stream);
    }
    let (status, _) = flick.request("GET", "/", None);
    assert_eq!(status, 200);
}

#[test]
fn keep_alive_connection_serves_many_requests() {
    let flick = Flick::spawn(&[]);
    let mut conn = Connection::open(&flick.sock).unwrap();
    for i in 0..20 {
        let body = format!(r#"{{"vcpu_count": 1, "mem_size_mib": {}}}"#, 64 + i);
        let (status, _) = conn.call("PUT", "/machine-config", Some(&body)).unwrap();
        assert_eq!(status, 204);
        let (status, answer) = conn.call("GET", "/machine-config", None).unwrap();
        assert_eq!(status, 200);
        assert!(answer.contains(&format!("\"mem_size_mib\":{}", 64 + i)));
    }
}

#[test]
fn bad_requests_get_400_with_a_fault_message() {
    let flick = Flick::spawn(&[]);
    for (method, path, body, expected) in [
        ("GET", "/nope", None, "Invalid request method and/or path"),
        (
            "DELETE",
            "/machine-config",
            None,
            "Invalid request method and/or path",
        ),
        (
            "PUT",
            "/machine-config",
            Some("{"),
            "deserializing the json body",
        ),
        (
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count": 1, "mem_size_mib": 128, "x": 1}"#),
            "unknown field `x`",
        ),
        ("PUT", "/drives/a-b", Some("{}"), "alphanumeric characters"),
        (
            "PATCH",
            "/drives/a",
            Some(r#"{"drive_id": "b"}"#),
            "does not match",
        ),
        ("PUT", "/machine-config", None, "Empty PUT request."),
    ] {
        let (status, answer) = flick.request(method, path, body);
        assert_eq!(status, 400, "{method} {path}");
        assert!(fault_message(&answer).contains(expected), "{answer}");
    }
}

#[test]
fn curl_body_over_the_cap_is_refused() {
    if curl_missing() {
        return;
    }
    let flick = Flick::spawn(&[]);
    let body = format!(
        r#"{{"kernel_image_path": "/k", "boot_args": "{}"}}"#,
        "x".repeat(60_000)
    );
    let (status, answer) = flick.curl_call("PUT", "/boot-source", Some(&body));
    assert_eq!(status, 400);
    assert!(fault_message(&answer).contains("larger than the limit of 51200"));
    assert_eq!(flick.state(), "Not started");
}

#[test]
fn curl_large_body_with_expect_continue_does_not_stall() {
    if curl_missing() {
        return;
    }
    let flick = Flick::spawn(&["--http-api-max-payload-size", "4000000"]);
    let body_path = flick.dir.path("body.json");
    let body = format!(
        r#"{{"kernel_image_path": "/k", "boot_args": "{}"}}"#,
        "x".repeat(2 * 1024 * 1024)
    );
    std::fs::write(&body_path, body).unwrap();
    let data = format!("@{}", body_path.display());
    // curl waits this long for `100 Continue` before it sends the body anyway; longer than
    // `--max-time`, so a server that never says `100 Continue` fails the request.
    let out = flick.curl(&[
        "--expect100-timeout",
        "60",
        "-v",
        "-X",
        "PUT",
        "-H",
        "Content-Type: application/json",
        "--data-binary",
        &data,
        "-w",
        "%{http_code}",
        "http://localhost/boot-source",
    ]);
    let trace = String::from_utf8_lossy(&out.stderr);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "204", "{trace}");
    assert!(trace.contains("Expect: 100-continue"), "{trace}");
    assert!(trace.contains("100 Continue"), "{trace}");
}

#[test]
fn chunked_upload_is_refused_with_411() {
    if curl_missing() {
        return;
    }
    let flick = Flick::spawn(&[]);
    let out = flick.curl(&[
        "-X",
        "PUT",
        "-H",
        "Transfer-Encoding: chunked",
        "-d",
        r#"{"action_type": "InstanceStart"}"#,
        "-w",
        "\n%{http_code}",
        "http://localhost/actions",
    ]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.ends_with("\n411"), "{text}");
    assert_eq!(flick.state(), "Not started");
}

#[test]
fn connections_over_the_limit_are_told_to_come_back() {
    let flick = Flick::spawn(&[]);
    // Let the connection that probed for readiness end and free its slot.
    thread::sleep(Duration::from_millis(100));
    let held: Vec<UnixStream> = (0..64)
        .map(|_| UnixStream::connect(&flick.sock).unwrap())
        .collect();
    let mut extra = UnixStream::connect(&flick.sock).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // The server may answer and close before the request is written: ignore a broken pipe.
    let _ = extra.write_all(b"GET / HTTP/1.1\r\n\r\n");
    let (status, answer) = read_response(&mut BufReader::new(extra)).unwrap();
    assert_eq!(status, 503);
    assert!(fault_message(&answer).contains("Too many open connections"));
    drop(held);
    let start = Instant::now();
    while flick.request("GET", "/", None).0 != 200 {
        assert!(
            start.elapsed() < VM_TIMEOUT,
            "the held slots were never freed"
        );
        thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn metrics_list_vmm_and_api_lines() {
    let flick = Flick::spawn(&[]);
    flick.request("GET", "/", None);
    let (status, body) = flick.request("GET", "/metrics", None);
    assert_eq!(status, 200);
    assert!(body.contains("flick_boot_time_us "), "{body}");
    assert!(
        body.contains("flick_api_requests_total{path=\"/\",method=\"GET\",status=\"200\"} 1"),
        "{body}"
    );
    assert!(body.contains("flick_api_request_duration_seconds_count "));
}

#[test]
fn version_flag_prints_the_version_without_serving() {
    let out = Command::new(FLICK).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        format!("flick v{}\n", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn no_api_without_config_file_is_refused() {
    let out = Command::new(FLICK).arg("--no-api").output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8(out.stderr)
        .unwrap()
        .contains("--no-api requires --config-file"));
}

/// The guest's console output has grown past `len` bytes within `over`.
fn output_grows(flick: &Flick, len: usize, over: Duration) -> bool {
    thread::sleep(over);
    flick.stdout().len() > len
}

/// Waits until the guest's console output grows past `len` bytes: it is running.
fn wait_for_growth(flick: &Flick, len: usize, what: &str) {
    let start = Instant::now();
    while flick.stdout().len() <= len {
        assert!(start.elapsed() < VM_TIMEOUT, "{what}: {}", flick.stdout());
        thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn pause_stops_the_guest_and_resume_continues_it() {
    if curl_missing() || kvm_missing() {
        return;
    }
    let guest = test_guest();
    let flick = Flick::spawn(&[]);
    flick.boot(
        &guest,
        "tg.smp=0 tg.count=1000000 tg.delay_ms=2 tg.exit=halt",
    );
    flick.wait_for_output("count: 5\n");
    wait_for_growth(&flick, flick.stdout().len(), "guest is not counting");

    let (status, body) = flick.curl_call("PATCH", "/vm", Some(r#"{"state": "Paused"}"#));
    assert_eq!(status, 204, "{body}");
    assert_eq!(flick.state(), "Paused");
    thread::sleep(Duration::from_millis(50));
    let paused_len = flick.stdout().len();
    // A paused guest prints nothing however long we watch; a slow host cannot break this.
    assert!(
        !output_grows(&flick, paused_len, Duration::from_millis(300)),
        "guest ran while paused"
    );

    let (status, body) = flick.curl_call("PATCH", "/vm", Some(r#"{"state": "Resumed"}"#));
    assert_eq!(status, 204, "{body}");
    assert_eq!(flick.state(), "Running");
    wait_for_growth(&flick, paused_len, "guest did not resume");
}

#[test]
fn pausing_twice_and_resuming_a_running_vm_are_harmless() {
    if curl_missing() || kvm_missing() {
        return;
    }
    let guest = test_guest();
    let flick = Flick::spawn(&[]);
    flick.boot(&guest, "tg.smp=0 tg.exit=halt");
    for state in ["Resumed", "Paused", "Paused", "Resumed"] {
        let body = format!(r#"{{"state": "{state}"}}"#);
        let (status, answer) = flick.curl_call("PATCH", "/vm", Some(&body));
        assert_eq!(status, 204, "{state}: {answer}");
    }
    assert_eq!(flick.state(), "Running");
}

#[test]
fn pause_of_a_multi_vcpu_guest_stops_every_vcpu() {
    if curl_missing() || kvm_missing() {
        return;
    }
    let guest = test_guest();
    let flick = Flick::spawn(&[]);
    let boot = serde_json::json!({"kernel_image_path": guest, "boot_args": "tg.exit=halt"});
    let (status, body) = flick.curl_call("PUT", "/boot-source", Some(&boot.to_string()));
    assert_eq!(status, 204, "{body}");
    let (status, body) = flick.curl_call(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 4, "mem_size_mib": 64}"#),
    );
    assert_eq!(status, 204, "{body}");
    let (status, body) = flick.curl_call(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
    );
    assert_eq!(status, 204, "{body}");
    let (status, body) = flick.curl_call("PATCH", "/vm", Some(r#"{"state": "Paused"}"#));
    assert_eq!(status, 204, "{body}");
    assert_eq!(flick.state(), "Paused");
}

/// `PUT /actions {"action_type": "FlushMetrics"}`.
fn flush_metrics(flick: &Flick) -> (u16, String) {
    flick.curl_call(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "FlushMetrics"}"#),
    )
}

/// The lines of a Firecracker-schema metrics file, parsed.
fn metrics_lines(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// Sum of `flick_vcpu_exits_total{reason}` over vCPUs in the Prometheus text.
fn prometheus_exits(text: &str, reason: &str) -> u64 {
    let needle = format!("reason=\"{reason}\"}}");
    text.lines()
        .filter(|l| l.starts_with("flick_vcpu_exits_total{") && l.contains(&needle))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

#[test]
fn metrics_file_gets_firecracker_schema_lines_at_boot_and_on_flush() {
    if curl_missing() || kvm_missing() {
        return;
    }
    let guest = test_guest();
    let flick = Flick::spawn(&["--id", "vm7"]);
    let metrics = flick.dir.path("metrics.jsonl");
    let body = serde_json::json!({
        "metrics_path": metrics,
        "emit_id": true,
        "properties": {"rack": "r1"},
    })
    .to_string();
    let (status, answer) = flick.curl_call("PUT", "/metrics", Some(&body));
    assert_eq!(status, 204, "{answer}");
    let (status, answer) = flick.curl_call("PUT", "/metrics", Some(&body));
    assert_eq!(status, 400, "metrics can be configured once: {answer}");
    let (status, _) = flush_metrics(&flick);
    assert_eq!(status, 400, "FlushMetrics before boot must be refused");
    flick.boot(&guest, "tg.smp=0 tg.exit=halt");
    flick.wait_for_output("testguest: done");
    // The first line is written at boot, without any FlushMetrics.
    wait_for_text(&metrics, "utc_timestamp_ms");
    for _ in 0..2 {
        let (status, answer) = flush_metrics(&flick);
        assert_eq!(status, 204, "{answer}");
    }
    let lines = metrics_lines(&metrics);
    assert_eq!(lines.len(), 3, "{lines:?}");
    for line in &lines {
        assert!(line["utc_timestamp_ms"].as_u64().unwrap() > 0, "{line}");
        assert_eq!(line["id"], "vm7", "{line}");
        assert_eq!(line["properties"]["rack"], "r1", "{line}");
        for field in [
            "exit_io_out",
            "exit_io_in",
            "exit_mmio_read",
            "exit_mmio_write",
        ] {
            assert!(line["vcpu"][field].is_u64(), "vcpu.{field} in {line}");
        }
        assert!(line["put_api_requests"]["actions_fails"].is_u64(), "{line}");
    }
    // Counters are written as increases since the previous line, as Firecracker does: the
    // lines add up to the totals (the guest has halted, so nothing moves any more).
    let (status, text) = flick.curl_call("GET", "/metrics", None);
    assert_eq!(status, 200);
    let total_out = prometheus_exits(&text, "io_out");
    assert!(total_out > 0, "the guest printed over the serial port");
    let summed: u64 = lines
        .iter()
        .map(|l| l["vcpu"]["exit_io_out"].as_u64().unwrap())
        .sum();
    assert_eq!(summed, total_out, "{lines:?}");
    let fails: u64 = lines
        .iter()
        .map(|l| l["put_api_requests"]["actions_fails"].as_u64().unwrap())
        .sum();
    assert!(
        fails >= 1,
        "the refused FlushMetrics is a failed action: {lines:?}"
    );

    // Operation latencies, once there was one to measure.
    assert!(lines[2]["latencies_us"].get("vmm_pause_vm").is_none());
    let (status, answer) = flick.curl_call("PATCH", "/vm", Some(r#"{"state": "Paused"}"#));
    assert_eq!(status, 204, "{answer}");
    let (status, answer) = flush_metrics(&flick);
    assert_eq!(status, 204, "{answer}");
    let lines = metrics_lines(&metrics);
    assert!(
        lines[3]["latencies_us"]["vmm_pause_vm"].is_u64(),
        "{}",
        lines[3]
    );
}

#[test]
fn metrics_path_flag_writes_the_first_line_at_boot() {
    if curl_missing() || kvm_missing() {
        return;
    }
    let dir = TempDir::new("metricsflag");
    let metrics = dir.path("metrics.jsonl");
    let metrics_arg = metrics.display().to_string();
    let flick = Flick::spawn_in(dir, &["--metrics-path", &metrics_arg]);
    flick.boot(&test_guest(), "tg.smp=0 tg.exit=halt");
    wait_for_text(&metrics, "utc_timestamp_ms");
    let lines = metrics_lines(&metrics);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0]["id"].is_null(), "emit_id is off by default");
    // Configured by the flag, so PUT /metrics is a second configuration.
    let body = serde_json::json!({"metrics_path": metrics}).to_string();
    let (status, answer) = flick.curl_call("PUT", "/metrics", Some(&body));
    assert_eq!(status, 400, "{answer}");
}

#[test]
fn send_ctrl_alt_del_reaches_the_guest_keyboard() {
    if curl_missing() || kvm_missing() {
        return;
    }
    let guest = test_guest();
    let mut flick = Flick::spawn(&[]);
    flick.boot(&guest, "tg.smp=0 tg.quiet=1 tg.kbd=1");
    flick.wait_for_output("kbd: waiting");
    let (status, body) = flick.curl_call(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "SendCtrlAltDel"}"#),
    );
    assert_eq!(status, 204, "{body}");
    // The guest sees the key presses, then resets through the i8042 and flick exits 0.
    assert!(flick.wait_exit().success(), "{}", flick.stdout());
    assert!(
        flick.stdout().contains("kbd: ctrl-alt-del"),
        "{}",
        flick.stdout()
    );
}
