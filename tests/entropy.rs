//! The entropy device (virtio-rng) end to end: the test guest's own driver against flick's
//! device, configured from a config file and through the API.

mod common;

use common::*;

/// The number in `rng: <n> bytes, <d> distinct values, ...`.
fn field(line: &str, after: &str) -> u32 {
    line.split(after)
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number after {after:?} in {line:?}"))
}

#[test]
fn guest_gets_random_bytes_from_the_entropy_device() {
    if !kvm_available() {
        return skip("no /dev/kvm");
    }
    let mut config = guest_config(&test_guest(), "tg.smp=0 tg.count=0 tg.rng=256", 1, 64);
    config["entropy"] = serde_json::json!({});
    let out = run_config(&config, &[], b"");
    out.assert_clean_exit();
    let line = out
        .line_starting("rng: ")
        .unwrap_or_else(|| panic!("no rng line: {out:#?}"));
    assert_eq!(field(line, "rng:"), 256, "{line}");
    assert!(field(line, "bytes,") > 150, "256 random bytes: {line}");
    assert!(
        out.stdout.contains("rng: second request differs"),
        "{}",
        out.stdout
    );
}

#[test]
fn without_an_entropy_device_the_guest_finds_none() {
    if !kvm_available() {
        return skip("no /dev/kvm");
    }
    let config = guest_config(&test_guest(), "tg.smp=0 tg.count=0 tg.rng=16", 1, 64);
    let out = run_config(&config, &[], b"");
    out.assert_clean_exit();
    assert!(out.stdout.contains("rng: none"), "{}", out.stdout);
}

#[test]
fn entropy_configured_through_the_api_is_rate_limited_and_counted() {
    if !kvm_available() {
        return skip("no /dev/kvm");
    }
    let flick = ApiFlick::start("rng-api");
    // A bucket of 300 bytes refilled over 100 ms: the second 256-byte request must wait.
    let limited = serde_json::json!({"rate_limiter": {
        "bandwidth": {"size": 300, "refill_time": 100}}});
    flick.put_all(&[
        (
            "/boot-source",
            serde_json::json!({"kernel_image_path": test_guest(),
                               "boot_args": "tg.smp=0 tg.count=0 tg.rng=256 tg.exit=halt"}),
        ),
        ("/entropy", limited.clone()),
        (
            "/actions",
            serde_json::json!({"action_type": "InstanceStart"}),
        ),
    ]);
    wait_for_text(&flick.stdout, "testguest: done");
    let (_, config) = flick.call("GET", "/vm/config", None);
    let config: serde_json::Value = serde_json::from_str(&config).unwrap();
    assert_eq!(config["entropy"], limited, "{config}");
    let (_, metrics) = flick.call("GET", "/metrics", None);
    assert!(
        metrics.contains("flick_entropy_bytes_total{device=\"rng\"} 512\n"),
        "{metrics}"
    );
    let throttled = metrics
        .lines()
        .find(|l| l.starts_with("flick_rate_limiter_throttled_total{device=\"rng\""))
        .unwrap_or_else(|| panic!("{metrics}"));
    assert!(
        !throttled.ends_with(" 0"),
        "the limiter never held a request: {throttled}"
    );
    let (status, answer) = flick.call("PUT", "/entropy", Some("{}"));
    assert_eq!(status, 400, "{answer}");
}

#[test]
fn unknown_entropy_fields_are_refused() {
    let mut config = guest_config(&test_guest(), "tg.count=0", 1, 64);
    config["entropy"] = serde_json::json!({"rate": 1});
    let out = run_config(&config, &[], b"");
    assert_one_line_error(&out, "unknown field `rate`");
}
