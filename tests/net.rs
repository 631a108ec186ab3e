//! virtio-net end to end: the test guest's own driver against flick's device and a TAP in a
//! network namespace the test creates (and removes).

mod common;

use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::Duration;

use common::*;

fn net_config(ns: &NetNs, args: &str, mac: &str) -> serde_json::Value {
    let args = format!(
        "tg.smp=0 tg.quiet=1 tg.ip={} tg.peer={} {args}",
        ns.guest_ip, ns.host_ip
    );
    let mut cfg = guest_config(&test_guest(), &args, 1, 64);
    cfg["network-interfaces"] =
        serde_json::json!([{"iface_id": "eth0", "host_dev_name": ns.tap, "guest_mac": mac}]);
    cfg
}

/// Runs flick inside the namespace with `config`; stdout goes to a file in `dir`.
fn spawn_in(ns: &NetNs, dir: &TempDir, tag: &str, config: &serde_json::Value) -> (Child, PathBuf) {
    let path = dir.write(&format!("{tag}.json"), config.to_string().as_bytes());
    let out = dir.path(&format!("{tag}.out"));
    let child = ns
        .command(&[
            flick_bin(),
            "--no-api",
            "--config-file",
            path.to_str().unwrap(),
        ])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(dir.path(&format!("{tag}.err"))).unwrap())
        .spawn()
        .unwrap();
    (child, out)
}

fn finish(mut child: Child) -> Option<i32> {
    wait_with_timeout(&mut child, VM_TIMEOUT)
}

#[test]
fn guest_resolves_and_pings_the_host_through_the_tap() {
    if !kvm_available() || !netns_available() {
        return;
    }
    let ns = NetNs::new("ping", 21);
    let dir = TempDir::new("netping");
    let (child, out) = spawn_in(
        &ns,
        &dir,
        "vm",
        &net_config(&ns, "tg.net=ping", "06:00:0a:00:15:02"),
    );
    let code = finish(child);
    let text = std::fs::read_to_string(out).unwrap();
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains(&format!("net0: arp peer={} mac=", ns.host_ip)),
        "{text}"
    );
    assert!(text.contains("net0: ping done ok=3/3"), "{text}");
}

#[test]
fn host_udp_echo_round_trips_through_the_guest() {
    if !kvm_available() || !netns_available() {
        return;
    }
    let ns = NetNs::new("echo", 22);
    let dir = TempDir::new("netecho");
    let cfg = net_config(&ns, "tg.net=serve tg.serve_ms=0", "06:00:0a:00:16:02");
    let (child, out) = spawn_in(&ns, &dir, "vm", &cfg);
    wait_for_text(&out, "net0: serve ready");
    let socket = ns.udp_socket(40007);
    socket
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let guest = format!("{}:7", ns.guest_ip);
    for i in 0..20u32 {
        let payload = format!("hello flick {i} {}", "x".repeat(i as usize * 50));
        socket.send_to(payload.as_bytes(), &guest).unwrap();
        let mut buf = [0u8; 2048];
        let (n, from) = socket.recv_from(&mut buf).expect("no echo from the guest");
        assert_eq!(&buf[..n], payload.as_bytes());
        assert_eq!(from.to_string(), guest);
    }
    socket.send_to(b"tg-stop", &guest).unwrap();
    let code = finish(child);
    let text = std::fs::read_to_string(out).unwrap();
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("udp=21"), "{text}");
}

#[test]
fn two_vms_on_two_taps_do_not_see_each_others_traffic() {
    if !kvm_available() || !netns_available() {
        return;
    }
    let ns_a = NetNs::new("isoa", 23);
    let ns_b = NetNs::new("isob", 23);
    let dir = TempDir::new("netiso");
    let (quiet, quiet_out) = spawn_in(
        &ns_b,
        &dir,
        "b",
        &net_config(&ns_b, "tg.net=serve tg.serve_ms=1500", "06:00:0a:00:17:03"),
    );
    wait_for_text(&quiet_out, "net0: serve ready");
    let (pinger, ping_out) = spawn_in(
        &ns_a,
        &dir,
        "a",
        &net_config(&ns_a, "tg.net=ping tg.ping_count=5", "06:00:0a:00:17:02"),
    );
    assert_eq!(finish(pinger), Some(0));
    assert_eq!(finish(quiet), Some(0));
    let a = std::fs::read_to_string(ping_out).unwrap();
    let b = std::fs::read_to_string(quiet_out).unwrap();
    assert!(a.contains("net0: ping done ok=5/5"), "{a}");
    assert!(b.contains("net0: serve done arp=0 icmp=0 udp=0"), "{b}");
}

#[test]
fn tx_rate_limit_slows_the_guest_to_the_configured_rate() {
    if !kvm_available() || !netns_available() {
        return;
    }
    let ns = NetNs::new("rl", 24);
    let dir = TempDir::new("netrl");
    let args = "tg.net=bench tg.net_frames=400 tg.net_size=200";
    let mut cfg = net_config(&ns, args, "06:00:0a:00:18:02");
    // 100 frames per 100 ms = 1000 frames/s; the first 100 come from the full bucket.
    cfg["network-interfaces"][0]["tx_rate_limiter"] =
        serde_json::json!({"ops": {"size": 100, "refill_time": 100}});
    let (child, limited_out) = spawn_in(&ns, &dir, "limited", &cfg);
    let code = finish(child);
    let err = std::fs::read_to_string(dir.path("limited.err")).unwrap_or_default();
    let text = std::fs::read_to_string(&limited_out).unwrap_or_default();
    assert_eq!(code, Some(0), "{text}\n{err}");
    let line = text
        .lines()
        .find(|l| l.starts_with("netbench: tx "))
        .unwrap_or_default();
    let slow: f64 = line
        .split("us=")
        .nth(1)
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{text}"));
    eprintln!("tx 400 frames limited to 1000 frames/s: {slow} us");
    // 300 frames beyond the full bucket at 1000/s take at least 0.3 s however fast or slow the
    // host is; allow 20% for how the guest's clock brackets the run. No comparison with an
    // unlimited run: on a loaded host that one is slow too.
    assert!(slow >= 240_000.0, "limited run too fast: {slow} us");
    // About 16 times the configured time: catches a limiter that refills far too slowly, with
    // room for a slow host's own run time.
    assert!(
        slow <= 5_000_000.0,
        "limited run far slower than configured: {slow} us"
    );
}

fn flick_error(ns: &NetNs, config: &serde_json::Value) -> Outcome {
    let dir = TempDir::new("netbad");
    let path = dir.write("vm.json", config.to_string().as_bytes());
    let cmd = ns.command(&[
        flick_bin(),
        "--no-api",
        "--config-file",
        path.to_str().unwrap(),
    ]);
    run_command(cmd, b"")
}

#[test]
fn missing_busy_or_misnamed_taps_and_bad_macs_are_refused_before_boot() {
    if !kvm_available() || !netns_available() {
        return;
    }
    let ns = NetNs::new("bad", 25);
    let mut missing = net_config(&ns, "", "06:00:0a:00:19:02");
    missing["network-interfaces"][0]["host_dev_name"] = "nosuchtap0".into();
    let out = flick_error(&ns, &missing);
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert!(
        out.stderr.contains("TAP device nosuchtap0 does not exist"),
        "{out:#?}"
    );

    let mut bad_mac = net_config(&ns, "", "06:00:0a:00:19:02");
    bad_mac["network-interfaces"][0]["guest_mac"] = "06:00:0a:00:19".into();
    let out = flick_error(&ns, &bad_mac);
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert!(out.stderr.contains("invalid guest_mac"), "{out:#?}");

    let dir = TempDir::new("netbusy");
    let (holder, holder_out) = spawn_in(
        &ns,
        &dir,
        "holder",
        &net_config(&ns, "tg.net=serve tg.serve_ms=0", "06:00:0a:00:19:03"),
    );
    wait_for_text(&holder_out, "net0: serve ready");
    let out = flick_error(&ns, &net_config(&ns, "", "06:00:0a:00:19:04"));
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert!(out.stderr.contains("is busy"), "{out:#?}");
    let socket = ns.udp_socket(40008);
    socket
        .send_to(b"tg-stop", format!("{}:7", ns.guest_ip))
        .unwrap();
    assert_eq!(finish(holder), Some(0));
}

#[test]
fn network_still_works_after_snapshot_restore() {
    if !kvm_available() || !netns_available() {
        return;
    }
    let ns = NetNs::new("snap", 26);
    let dir = TempDir::new("netsnap");
    let sock = dir.path("api.sock");
    let out = dir.path("source.out");
    let mut source = ns
        .command(&[flick_bin(), "--api-sock", sock.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_socket(&sock);
    let cfg = net_config(
        &ns,
        "tg.count=60 tg.delay_ms=10 tg.net=serve tg.serve_ms=0 tg.net_late=1",
        "06:00:0a:00:1a:02",
    );
    let calls = [
        ("/boot-source", cfg["boot-source"].clone()),
        (
            "/network-interfaces/eth0",
            cfg["network-interfaces"][0].clone(),
        ),
        (
            "/actions",
            serde_json::json!({"action_type": "InstanceStart"}),
        ),
    ];
    for (path, body) in calls {
        let (status, answer) = api_call(&sock, "PUT", path, Some(&body.to_string()));
        assert_eq!(status, 204, "{path}: {answer}");
    }
    wait_for_text(&out, "count: 5\n");
    let (status, answer) = api_call(&sock, "PATCH", "/vm", Some(r#"{"state": "Paused"}"#));
    assert_eq!(status, 204, "{answer}");
    let (state, mem) = (dir.path("vm.state"), dir.path("vm.mem"));
    let create = serde_json::json!({"snapshot_path": state, "mem_file_path": mem});
    let (status, answer) = api_call(&sock, "PUT", "/snapshot/create", Some(&create.to_string()));
    assert_eq!(status, 204, "{answer}");
    source.kill().unwrap();
    source.wait().unwrap();

    // The restored guest finishes counting, then serves on the same TAP.
    let restored_out = dir.path("restored.out");
    let restored = ns
        .command(&[
            flick_bin(),
            "--no-api",
            "--resume",
            "--restore-snapshot",
            state.to_str().unwrap(),
            "--restore-mem",
            mem.to_str().unwrap(),
        ])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&restored_out).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_text(&restored_out, "net0: serve ready");
    let socket = ns.udp_socket(40009);
    socket
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let guest = format!("{}:7", ns.guest_ip);
    socket.send_to(b"after restore", &guest).unwrap();
    let mut buf = [0u8; 64];
    let (n, _) = socket.recv_from(&mut buf).expect("no echo after restore");
    assert_eq!(&buf[..n], b"after restore");
    socket.send_to(b"tg-stop", &guest).unwrap();
    assert_eq!(finish(restored), Some(0));
    let text = std::fs::read_to_string(&restored_out).unwrap();
    assert!(
        !text.contains("count: 1\n"),
        "the restored guest started over: {text}"
    );
    assert!(text.contains("count: 60\n"), "{text}");
}

#[test]
fn a_tap_is_found_in_a_namespace_entered_after_sys_was_mounted() {
    if !kvm_available() || !netns_available() {
        return;
    }
    // `nsenter --net` joins the namespace without mounting its /sys (unlike `ip netns exec`):
    // /sys/class/net still lists the host's interfaces, not tap0.
    if !tool_available("nsenter", "util-linux") {
        return;
    }
    let ns = NetNs::new("nsenter", 27);
    let dir = TempDir::new("netnsenter");
    let cfg = net_config(&ns, "tg.net=ping", "06:00:0a:00:1b:02");
    let path = dir.write("vm.json", cfg.to_string().as_bytes());
    let mut cmd = std::process::Command::new("nsenter");
    cmd.arg(format!("--net=/var/run/netns/{}", ns.name))
        .arg(flick_bin())
        .arg("--no-api")
        .arg("--config-file")
        .arg(&path);
    let out = run_command(cmd, b"");
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert!(out.stdout.contains("net0: ping done ok=3/3"), "{out:#?}");
}
