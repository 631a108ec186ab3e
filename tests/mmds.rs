//! MMDS end to end: the data store and configuration over the API, `--metadata` and
//! `--mmds-size-limit`, the test guest resolving the MMDS address over virtio-net, and Linux user
//! space fetching metadata with busybox `wget` (V1, and V2 with a session token).
//!
//! Tests with a network interface run flick in a network namespace with a TAP (root and
//! iproute2); tests that boot need /dev/kvm; the Linux tests need the guest artifacts
//! (`FLICK_KERNEL_BZIMAGE`, `FLICK_INITRAMFS`). Without them they are skipped (failed under CI).

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;

/// A flick serving the API in a temporary directory (inside `ns` when given); killed on drop.
struct Api {
    dir: TempDir,
    sock: PathBuf,
    child: Child,
}

impl Api {
    fn start(tag: &str, ns: Option<&NetNs>, args: &[&str]) -> Api {
        let dir = TempDir::new(tag);
        let sock = dir.path("api.sock");
        let mut argv = vec![flick_bin(), "--api-sock", sock.to_str().unwrap()];
        argv.extend_from_slice(args);
        let mut cmd = match ns {
            Some(ns) => ns.command(&argv),
            None => {
                let mut cmd = Command::new(argv[0]);
                cmd.args(&argv[1..]);
                cmd
            }
        };
        let child = cmd
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.path("console")).unwrap())
            .stderr(std::fs::File::create(dir.path("log")).unwrap())
            .spawn()
            .unwrap();
        wait_for_socket(&sock);
        Api { dir, sock, child }
    }

    fn call(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        api_call(&self.sock, method, path, body)
    }

    /// Requires 204 for `method path body`.
    fn ok(&self, method: &str, path: &str, body: serde_json::Value) {
        let (status, answer) = self.call(method, path, Some(&body.to_string()));
        assert_eq!(status, 204, "{method} {path}: {answer}");
    }

    /// Requires `status` with a `fault_message` containing `needle`.
    fn fault(&self, method: &str, path: &str, body: &str, status: u16, needle: &str) {
        let (got, answer) = self.call(method, path, Some(body));
        assert_eq!(got, status, "{method} {path} {body}: {answer}");
        let fault: serde_json::Value = serde_json::from_str(&answer).unwrap();
        let message = fault["fault_message"].as_str().unwrap_or_default();
        assert!(message.contains(needle), "{needle:?} not in {message:?}");
    }

    fn mmds(&self) -> serde_json::Value {
        let (status, body) = self.call("GET", "/mmds", None);
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run_flick(args: &[&str]) -> Outcome {
    let mut cmd = Command::new(flick_bin());
    cmd.args(args);
    run_command(cmd, b"")
}

#[test]
fn the_data_store_is_replaced_patched_and_read_back() {
    let api = Api::start("mmdsstore", None, &[]);
    assert_eq!(api.mmds(), serde_json::json!({}));
    api.fault(
        "PATCH",
        "/mmds",
        r#"{"a": 1}"#,
        400,
        "MMDS error: The MMDS data store is not initialized.",
    );
    let doc = serde_json::json!({"latest": {"meta-data": {"ami-id": "ami-1", "keep": "k"}}});
    api.ok("PUT", "/mmds", doc.clone());
    assert_eq!(api.mmds(), doc);
    api.ok(
        "PATCH",
        "/mmds",
        serde_json::json!({"latest": {"meta-data": {"ami-id": "ami-2", "keep": null, "n": [1]}}}),
    );
    let patched = serde_json::json!({"latest": {"meta-data": {"ami-id": "ami-2", "n": [1]}}});
    assert_eq!(api.mmds(), patched);
    api.fault(
        "PUT",
        "/mmds",
        "{not json",
        400,
        "deserializing the json body",
    );
    api.fault(
        "PUT",
        "/mmds/other",
        "{}",
        400,
        "Unrecognized PUT request path `other`.",
    );
    assert_eq!(api.mmds(), patched, "refused requests change nothing");
}

#[test]
fn documents_over_the_size_limit_get_413_and_change_nothing() {
    let api = Api::start("mmdslimit", None, &["--mmds-size-limit", "64"]);
    api.ok("PUT", "/mmds", serde_json::json!({"a": "small"}));
    let big = format!(r#"{{"a": "{}"}}"#, "x".repeat(100));
    let message = "MMDS limit exceeded error: The MMDS patch request doesn't fit.";
    api.fault("PUT", "/mmds", &big, 413, message);
    api.fault("PATCH", "/mmds", &big, 413, message);
    assert_eq!(api.mmds(), serde_json::json!({"a": "small"}));
}

#[test]
fn the_default_size_limit_follows_the_api_payload_limit() {
    let api = Api::start(
        "mmdsdeflimit",
        None,
        &["--http-api-max-payload-size", "200000"],
    );
    let big = serde_json::json!({"a": "x".repeat(60_000)});
    api.ok("PUT", "/mmds", big);
    let default = Api::start("mmdsdeflimit2", None, &[]);
    let over = format!(r#"{{"a": "{}"}}"#, "x".repeat(51_200));
    let (status, _) = default.call("PUT", "/mmds", Some(&over));
    assert_ne!(status, 204, "51,200 bytes is the default limit");
}

#[test]
fn mmds_config_needs_a_configured_interface() {
    let api = Api::start("mmdsnonic", None, &[]);
    api.fault(
        "PUT",
        "/mmds/config",
        r#"{"network_interfaces": ["eth0"]}"#,
        400,
        "does not correspond to any existing network interface",
    );
    api.fault(
        "PUT",
        "/mmds/config",
        r#"{"network_interfaces": ["eth0"], "version": "V3"}"#,
        400,
        "unknown variant `V3`",
    );
    api.fault(
        "PUT",
        "/mmds/config",
        r#"{"network_interfaces": ["eth0"], "ipv4_address": "not-an-ip"}"#,
        400,
        "deserializing the json body",
    );
    api.fault(
        "PUT",
        "/mmds/config",
        r#"{"network_interfaces": ["eth0"], "turbo": true}"#,
        400,
        "unknown field `turbo`",
    );
}

#[test]
fn mmds_config_is_validated_and_shown_in_the_vm_config() {
    if !netns_available() {
        return;
    }
    let ns = NetNs::new("mmdscfg", 41);
    let api = Api::start("mmdscfg", Some(&ns), &[]);
    let nic = serde_json::json!({"iface_id": "eth0", "host_dev_name": ns.tap});
    api.ok("PUT", "/network-interfaces/eth0", nic);
    let put = |body: &str, needle: &str| api.fault("PUT", "/mmds/config", body, 400, needle);
    put(r#"{"network_interfaces": ["eth1"]}"#, "does not correspond");
    put(r#"{"network_interfaces": []}"#, "is empty");
    for ip in ["10.0.0.1", "169.254.0.10", "169.254.255.3"] {
        let body = format!(r#"{{"network_interfaces": ["eth0"], "ipv4_address": "{ip}"}}"#);
        put(&body, "The MMDS IPv4 address is not link local.");
    }
    api.ok(
        "PUT",
        "/mmds/config",
        serde_json::json!({"network_interfaces": ["eth0"], "version": "V2",
                           "ipv4_address": "169.254.170.2", "imds_compat": true}),
    );
    let (status, body) = api.call("GET", "/vm/config", None);
    assert_eq!(status, 200);
    let config: serde_json::Value = serde_json::from_str(&body).unwrap();
    let expected = serde_json::json!({"version": "V2", "network_interfaces": ["eth0"],
                                      "ipv4_address": "169.254.170.2", "imds_compat": true});
    assert_eq!(config["mmds-config"], expected, "{body}");
}

#[test]
fn metadata_flag_loads_the_document_at_start() {
    let dir = TempDir::new("mmdsflag");
    let file = dir.write("meta.json", br#"{"latest": {"meta-data": {"id": "i-1"}}}"#);
    let api = Api::start("mmdsflag", None, &["--metadata", file.to_str().unwrap()]);
    assert_eq!(
        api.mmds(),
        serde_json::json!({"latest": {"meta-data": {"id": "i-1"}}})
    );
}

#[test]
fn bad_metadata_files_stop_flick_with_one_line() {
    let dir = TempDir::new("mmdsbad");
    let missing = dir.path("missing.json");
    let bad = dir.write("bad.json", b"{\"a\": ");
    let big = dir.write(
        "big.json",
        format!(r#"{{"a": "{}"}}"#, "x".repeat(200)).as_bytes(),
    );
    let sock = dir.path("api.sock");
    let sock = sock.to_str().unwrap();
    let cases: [(&[&str], &str); 3] = [
        (
            &["--metadata", missing.to_str().unwrap()],
            "cannot read metadata file",
        ),
        (
            &["--metadata", bad.to_str().unwrap()],
            "invalid metadata file",
        ),
        (
            &[
                "--metadata",
                big.to_str().unwrap(),
                "--mmds-size-limit",
                "50",
            ],
            "doesn't fit",
        ),
    ];
    for (args, needle) in cases {
        let mut argv = vec!["--api-sock", sock];
        argv.extend_from_slice(args);
        let out = run_flick(&argv);
        assert_one_line_error(&out, needle);
        assert!(!Path::new(sock).exists(), "the API socket is removed");
    }
}

#[test]
fn a_config_file_with_mmds_for_an_unknown_interface_is_refused() {
    let config = serde_json::json!({
        "boot-source": {"kernel_image_path": test_guest()},
        "mmds-config": {"network_interfaces": ["eth0"]}
    });
    let out = run_config(&config, &[], b"");
    assert_one_line_error(
        &out,
        "does not correspond to any existing network interface",
    );
}

/// Boots the test guest in `ns` with MMDS on eth0, pings `peer` from `guest_ip` and halts (flick
/// keeps running).
fn ping_from_test_guest(ns: &NetNs, tag: &str, peer: &str, guest_ip: &str) -> (Api, String) {
    let api = Api::start(tag, Some(ns), &["--level", "Info"]);
    let args = format!(
        "tg.smp=0 tg.quiet=1 tg.ip={guest_ip} tg.peer={peer} tg.net=ping tg.ping_count=1 \
         tg.net_timeout_ms=1000 tg.exit=halt"
    );
    api.ok(
        "PUT",
        "/boot-source",
        serde_json::json!({"kernel_image_path": test_guest(), "boot_args": args}),
    );
    api.ok(
        "PUT",
        "/machine-config",
        serde_json::json!({"vcpu_count": 1, "mem_size_mib": 64}),
    );
    api.ok(
        "PUT",
        "/network-interfaces/eth0",
        serde_json::json!({"iface_id": "eth0", "host_dev_name": ns.tap,
                           "guest_mac": "06:00:0a:00:2a:02"}),
    );
    api.ok(
        "PUT",
        "/mmds/config",
        serde_json::json!({"network_interfaces": ["eth0"]}),
    );
    api.ok(
        "PUT",
        "/actions",
        serde_json::json!({"action_type": "InstanceStart"}),
    );
    let console = wait_for_text(&api.dir.path("console"), "ping done");
    (api, console)
}

#[test]
fn the_test_guest_resolves_mmds_and_still_reaches_the_tap() {
    if !kvm_available() || !netns_available() {
        return;
    }
    let ns = NetNs::new("mmdsarp", 42);
    let (api, console) = ping_from_test_guest(&ns, "mmdsarp", "169.254.169.254", "169.254.0.2");
    assert!(
        console.contains("net0: arp peer=169.254.169.254 mac=06:01:23:45:67:01"),
        "{console}"
    );
    assert!(
        console.contains("ping done ok=0/1"),
        "ICMP to MMDS is dropped: {console}"
    );
    // Runtime: the document can change, the configuration cannot.
    api.ok("PUT", "/mmds", serde_json::json!({"late": "yes"}));
    api.fault(
        "PUT",
        "/mmds/config",
        r#"{"network_interfaces": ["eth0"]}"#,
        400,
        "only allowed before the VM starts",
    );
    drop(api);

    let (_api, console) = ping_from_test_guest(&ns, "mmdspass", &ns.host_ip, &ns.guest_ip);
    let peer = format!("net0: arp peer={} mac=", ns.host_ip);
    assert!(console.contains(&peer), "{console}");
    assert!(console.contains("ping done ok=1/1"), "{console}");
}

/// One Linux VM at a time (see tests/linux.rs).
static ONE_LINUX_VM: Mutex<()> = Mutex::new(());
/// A hang guard: Linux boots take minutes on a PVM host, over ten on a loaded one.
const LINUX_TIMEOUT: Duration = Duration::from_secs(1800);

fn artifact(var: &str) -> Option<PathBuf> {
    match std::env::var_os(var) {
        Some(path) => Some(PathBuf::from(path)),
        None if std::env::var_os("CI").is_some() => panic!("{var} is not set"),
        None => {
            skip(&format!(
                "{var} is not set (eval scripts/guest-artifacts.sh)"
            ));
            None
        }
    }
}

const METADATA: &str =
    r#"{"latest": {"meta-data": {"ami-id": "ami-flick", "local-ipv4": "169.254.0.2"}}}"#;

/// Small hash tables: every instruction of the guest kernel is emulated on a PVM host, and
/// zeroing the default tables is a good part of its boot there.
const BOOT_ARGS: &str = "console=ttyS0 reboot=k panic=1 flick.init=serve thash_entries=256 \
                         uhash_entries=256 dhash_entries=4096 ihash_entries=4096";

/// A config that boots Linux with `flick.init=serve` and MMDS `version` on eth0 in `ns`.
fn linux_config(ns: &NetNs, version: &str) -> Option<serde_json::Value> {
    let kernel = artifact("FLICK_KERNEL_BZIMAGE")?;
    let initrd = artifact("FLICK_INITRAMFS")?;
    Some(serde_json::json!({
        "boot-source": {"kernel_image_path": kernel, "initrd_path": initrd,
                        "boot_args": BOOT_ARGS},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 128},
        "network-interfaces": [{"iface_id": "eth0", "host_dev_name": ns.tap,
                                "guest_mac": "06:00:0a:00:2b:02"}],
        "mmds-config": {"network_interfaces": ["eth0"], "version": version}
    }))
}

/// Starts flick in `ns` with `args`, console in `dir/<tag>.console`, stdin piped.
fn spawn_flick(ns: &NetNs, dir: &TempDir, tag: &str, args: &[&str]) -> (Child, PathBuf) {
    let console = dir.path(&format!("{tag}.console"));
    let mut argv = vec![flick_bin(), "--level", "Info"];
    argv.extend_from_slice(args);
    let child = ns
        .command(&argv)
        .stdin(Stdio::piped())
        .stdout(std::fs::File::create(&console).unwrap())
        .stderr(std::fs::File::create(dir.path(&format!("{tag}.log"))).unwrap())
        .spawn()
        .unwrap();
    (child, console)
}

/// Waits until the console shows `WAITING`; fails the test if flick ends or time runs out.
fn wait_for_waiting(child: &mut Child, console: &Path, start: Instant) {
    loop {
        let text = std::fs::read_to_string(console).unwrap_or_default();
        if text.contains("WAITING") {
            return;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("flick ended ({status}) before init waited: {text}");
        }
        if start.elapsed() > LINUX_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("Linux did not reach WAITING in time: {text}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Types `command` on the console, waits for flick to end, requires exit code 0; the console.
fn type_and_finish(mut child: Child, console: &Path, command: &str) -> String {
    let stdin = child.stdin.as_mut().unwrap();
    stdin.write_all(format!("{command}\n").as_bytes()).unwrap();
    stdin.flush().unwrap();
    let code = wait_with_timeout(&mut child, LINUX_TIMEOUT);
    let text = std::fs::read_to_string(console).unwrap_or_default();
    let log = std::fs::read_to_string(console.with_extension("log")).unwrap_or_default();
    assert_eq!(code, Some(0), "{text}\n{log}");
    text
}

/// Boots Linux (`flick.init=serve`) in `ns` with MMDS `version` on eth0 and `--metadata`, types
/// `command` once init waits for it, and returns the console once flick has exited (code 0).
fn on_pvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

fn linux_serve(ns: &NetNs, tag: &str, version: &str, command: &str) -> Option<String> {
    let text = linux_serve_once(ns, tag, version, command)?;
    // On a PVM host, guest user space inherits the host's known fault: a process now and then
    // segfaults (its TLS read with FS base 0, issue 13), which here loses the metadata fetch it
    // ran. One more run then, reported as that known issue; a second segfault fails the test.
    if on_pvm() && text.contains("Segmentation fault") {
        known_issue(
            "a guest process segfaulted on this PVM host (the PVM user-space fault of issue 13); \
             the Linux run was repeated once",
        );
        return linux_serve_once(ns, &format!("{tag}-again"), version, command);
    }
    Some(text)
}

fn linux_serve_once(ns: &NetNs, tag: &str, version: &str, command: &str) -> Option<String> {
    let config = linux_config(ns, version)?;
    let dir = TempDir::new(tag);
    let meta = dir.write("meta.json", METADATA.as_bytes());
    let path = dir.write("vm.json", config.to_string().as_bytes());
    let _one = ONE_LINUX_VM.lock().unwrap_or_else(|p| p.into_inner());
    let start = Instant::now();
    let args = [
        "--no-api",
        "--metadata",
        meta.to_str().unwrap(),
        "--config-file",
        path.to_str().unwrap(),
    ];
    let (mut child, console) = spawn_flick(ns, &dir, "vm", &args);
    wait_for_waiting(&mut child, &console, start);
    let text = type_and_finish(child, &console, command);
    eprintln!("Linux MMDS run took {:?}", start.elapsed());
    Some(text)
}

/// Gets a V2 token with `nc` (busybox `wget` cannot `PUT`), tries a `GET` without it, then with.
fn v2_command(ns: &NetNs) -> String {
    let put = "printf 'PUT /latest/api/token HTTP/1.0\\r\\nX-metadata-token-ttl-seconds: 60\\r\\n\
               \\r\\n' | nc 169.254.169.254 80 | tail -n 1";
    let url = "http://169.254.169.254/latest/meta-data/ami-id";
    format!(
        "{}; T=$({put}); echo \"TOKEN_LEN=${{#T}}\"; \
         wget -q -O - {url} || echo NO_TOKEN_REFUSED; \
         echo \"AMI=$(wget -q -O - --header \"X-metadata-token: $T\" {url})\"",
        net_setup(ns)
    )
}

/// Sets up eth0 with the link-local address (MMDS) and the namespace's subnet (the TAP).
fn net_setup(ns: &NetNs) -> String {
    format!(
        "ip addr add 169.254.0.2/16 dev eth0; ip addr add {}/24 dev eth0; ip link set eth0 up",
        ns.guest_ip
    )
}

#[test]
fn linux_fetches_metadata_with_wget_from_mmds_v1() {
    if !kvm_available() || !netns_available() {
        return;
    }
    let ns = NetNs::new("mmdsv1", 43);
    let url = "http://169.254.169.254/latest/meta-data";
    let command = format!(
        "{}; echo \"AMI=$(wget -q -O - {url}/ami-id)\"; echo \"KEYS=$(wget -q -O - {url}/ | \
         tr '\\n' ,)\"; ping -c 1 -W 10 {} >/dev/null && echo PING_OK",
        net_setup(&ns),
        ns.host_ip
    );
    let Some(console) = linux_serve(&ns, "linuxmmdsv1", "V1", &command) else {
        return;
    };
    assert!(console.contains("AMI=ami-flick"), "{console}");
    assert!(console.contains("KEYS=ami-id,local-ipv4"), "{console}");
    assert!(
        console.contains("PING_OK"),
        "other traffic reaches the TAP: {console}"
    );
}

#[test]
fn linux_fetches_metadata_with_a_v2_session_token() {
    if !kvm_available() || !netns_available() {
        return;
    }
    let ns = NetNs::new("mmdsv2", 44);
    let command = v2_command(&ns);
    let Some(console) = linux_serve(&ns, "linuxmmdsv2", "V2", &command) else {
        return;
    };
    assert!(console.contains("TOKEN_LEN=64"), "{console}");
    assert!(console.contains("NO_TOKEN_REFUSED"), "{console}");
    assert!(console.contains("AMI=ami-flick"), "{console}");
}

#[test]
fn linux_restored_from_a_snapshot_answers_mmds() {
    if !kvm_available() || !netns_available() {
        return;
    }
    let ns = NetNs::new("mmdssnap", 45);
    let Some(config) = linux_config(&ns, "V2") else {
        return;
    };
    let dir = TempDir::new("linuxmmdssnap");
    let path = dir.write("vm.json", config.to_string().as_bytes());
    let (state, mem) = (dir.path("vm.state"), dir.path("vm.mem"));
    let _one = ONE_LINUX_VM.lock().unwrap_or_else(|p| p.into_inner());
    let start = Instant::now();

    let sock = dir.path("source.sock");
    let args = [
        "--api-sock",
        sock.to_str().unwrap(),
        "--config-file",
        path.to_str().unwrap(),
    ];
    let (mut source, console) = spawn_flick(&ns, &dir, "source", &args);
    wait_for_socket(&sock);
    wait_for_waiting(&mut source, &console, start);
    let call = |sock: &Path, method: &str, path: &str, body: serde_json::Value| {
        let (status, answer) = api_call(sock, method, path, Some(&body.to_string()));
        assert_eq!(status, 204, "{method} {path}: {answer}");
    };
    call(
        &sock,
        "PATCH",
        "/vm",
        serde_json::json!({"state": "Paused"}),
    );
    call(
        &sock,
        "PUT",
        "/snapshot/create",
        serde_json::json!({"snapshot_path": state, "mem_file_path": mem}),
    );
    let _ = source.kill();
    let _ = source.wait();

    let restore_and_fetch = |name: &str| {
        let sock = dir.path(&format!("{name}.sock"));
        let (restored, console) =
            spawn_flick(&ns, &dir, name, &["--api-sock", sock.to_str().unwrap()]);
        wait_for_socket(&sock);
        call(
            &sock,
            "PUT",
            "/snapshot/load",
            serde_json::json!({"snapshot_path": state,
                           "mem_backend": {"backend_type": "File", "backend_path": mem},
                           "resume_vm": true}),
        );
        let (_, vm_config) = api_call(&sock, "GET", "/vm/config", None);
        let vm_config: serde_json::Value = serde_json::from_str(&vm_config).unwrap();
        assert_eq!(vm_config["mmds-config"]["version"], "V2", "{vm_config}");
        assert_eq!(
            vm_config["mmds-config"]["network_interfaces"],
            serde_json::json!(["eth0"])
        );
        let (_, document) = api_call(&sock, "GET", "/mmds", None);
        assert_eq!(document, "{}", "the document is not saved in snapshots");
        let metadata: serde_json::Value = serde_json::from_str(METADATA).unwrap();
        call(&sock, "PUT", "/mmds", metadata);

        // The guest's eth0 is still down (init waits before setting it up): set it up and fetch.
        type_and_finish(restored, &console, &v2_command(&ns))
    };
    let mut text = restore_and_fetch("restored");
    // As in linux_serve: one more restore after the PVM host's known user-space segfault.
    if on_pvm() && text.contains("Segmentation fault") {
        known_issue(
            "a guest process segfaulted on this PVM host (the PVM user-space fault of issue 13); \
             the restore was repeated once",
        );
        text = restore_and_fetch("restored-again");
    }
    eprintln!("Linux MMDS snapshot run took {:?}", start.elapsed());
    assert!(text.contains("TOKEN_LEN=64"), "{text}");
    assert!(text.contains("AMI=ami-flick"), "{text}");
}
