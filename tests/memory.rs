//! Guest memory options: `huge_pages: Transparent` marks guest RAM for transparent huge pages.

mod common;

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
    let flick = ApiFlick::start("thp");
    flick.put_all(&[
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
    ]);
    wait_for_text(&flick.stdout, "testguest: done");
    thp_eligible(flick.child.id(), 96 * 1024)
}

#[test]
fn transparent_huge_pages_mark_guest_ram_eligible() {
    if !kvm_available() {
        return skip("no /dev/kvm");
    }
    let mode =
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    let transparent = guest_ram_thp("Transparent");
    if mode.contains("[never]") {
        // The host has THP off: the option cannot take effect, and the guest still runs.
        assert_eq!(transparent, Some(false), "THP is off on this host: {mode}");
        return;
    }
    assert_eq!(transparent, Some(true), "THP mode: {mode}");
    if mode.contains("[madvise]") {
        // Unmarked, the guest mapping may merge with a neighbouring one; either way it is not
        // eligible. (In `always` mode every mapping is, so there is nothing to compare.)
        assert_ne!(guest_ram_thp("None"), Some(true));
    }
}

#[test]
fn hugetlbfs_pages_are_refused_when_configured() {
    let flick = ApiFlick::start("thp-refused");
    let body = r#"{"vcpu_count": 1, "mem_size_mib": 128, "huge_pages": "2M"}"#;
    let (status, answer) = flick.call("PUT", "/machine-config", Some(body));
    assert_eq!(status, 400, "{answer}");
    assert!(answer.contains("not supported by flick yet"), "{answer}");
}
