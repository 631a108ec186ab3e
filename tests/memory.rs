//! Guest memory options: `huge_pages: Transparent` marks guest RAM for transparent huge pages.

mod common;

use std::process::{Command, Stdio};

use common::*;

/// `THPeligible` of the mapping of exactly `size_kib` in `pid`'s smaps.
fn thp_eligible(pid: u32, size_kib: u64) -> Option<bool> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let mut in_guest = false;
    for line in smaps.lines() {
        if let Some(size) = line.strip_prefix("Size:") {
            in_guest = size.trim().trim_end_matches(" kB").trim() == size_kib.to_string();
        } else if let Some(v) = line.strip_prefix("THPeligible:") {
            if in_guest {
                return Some(v.trim() == "1");
            }
        }
    }
    None
}

fn guest_ram_thp(huge_pages: &str) -> Option<bool> {
    let dir = TempDir::new("thp");
    let sock = dir.path("api.sock");
    let out = dir.path("out");
    let mut child = Command::new(flick_bin())
        .arg("--api-sock")
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_socket(&sock);
    let calls = [
        (
            "/machine-config",
            serde_json::json!({"vcpu_count": 1, "mem_size_mib": 96, "huge_pages": huge_pages}),
        ),
        (
            "/boot-source",
            serde_json::json!({"kernel_image_path": test_guest(),
                               "boot_args": "tg.smp=0 tg.count=0 tg.exit=halt"}),
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
    wait_for_text(&out, "testguest: done");
    let eligible = thp_eligible(child.id(), 96 * 1024);
    let _ = child.kill();
    let _ = child.wait();
    eligible
}

#[test]
fn transparent_huge_pages_mark_guest_ram_eligible() {
    if !kvm_available() {
        return skip("no /dev/kvm");
    }
    let mode =
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    if !mode.contains("[madvise]") {
        return skip("transparent huge pages are not in madvise mode on this host");
    }
    assert_eq!(guest_ram_thp("Transparent"), Some(true));
    // Unmarked, the guest mapping may merge with a neighbouring one; either way it is not
    // eligible.
    assert_ne!(guest_ram_thp("None"), Some(true));
}

#[test]
fn hugetlbfs_pages_are_refused_when_configured() {
    let dir = TempDir::new("thp-refused");
    let sock = dir.path("api.sock");
    let mut child = Command::new(flick_bin())
        .arg("--api-sock")
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_socket(&sock);
    let body = r#"{"vcpu_count": 1, "mem_size_mib": 128, "huge_pages": "2M"}"#;
    let (status, answer) = api_call(&sock, "PUT", "/machine-config", Some(body));
    assert_eq!(status, 400, "{answer}");
    assert!(answer.contains("not supported by flick yet"), "{answer}");
    let _ = child.kill();
    let _ = child.wait();
}
