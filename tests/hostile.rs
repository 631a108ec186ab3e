//! Nothing a client or the host side of a device can do stalls the VMM: slow or absent readers
//! of what flick writes get their data dropped and counted, and the API keeps answering.

mod common;

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::process::Command;

use common::*;

#[test]
fn flush_metrics_to_a_fifo_nobody_reads_does_not_stall_the_api() {
    if !kvm_available() {
        return skip("no /dev/kvm");
    }
    let dir = TempDir::new("fifo-metrics");
    let fifo = dir.path("metrics.fifo");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    let flick = ApiFlick::start("fifo-metrics-vm");
    flick.put_all(&[
        (
            "/boot-source",
            serde_json::json!({"kernel_image_path": test_guest(),
                               "boot_args": "tg.smp=0 tg.count=0 tg.exit=halt"}),
        ),
        ("/metrics", serde_json::json!({"metrics_path": fifo})),
        (
            "/actions",
            serde_json::json!({"action_type": "InstanceStart"}),
        ),
    ]);
    let flush = serde_json::json!({"action_type": "FlushMetrics"}).to_string();
    // No reader: the line is lost, the request is answered (a blocking open would hang here
    // until the client's read timeout).
    let (status, answer) = flick.call("PUT", "/actions", Some(&flush));
    assert_eq!(status, 204, "{answer}");
    let (status, _) = flick.call("GET", "/", None);
    assert_eq!(status, 200);

    // With a reader the next line arrives and counts the two lost before (the one written at
    // boot and the one above).
    let mut reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .unwrap();
    wait_for_text(&flick.stdout, "testguest: done");
    let (status, answer) = flick.call("PUT", "/actions", Some(&flush));
    assert_eq!(status, 204, "{answer}");
    let mut line = String::new();
    let _ = reader.read_to_string(&mut line);
    let value: serde_json::Value = serde_json::from_str(line.trim()).unwrap_or_else(|e| {
        panic!("not one JSON line ({e}): {line:?}");
    });
    assert_eq!(value["logger"]["missed_metrics_count"], 2, "{line}");
    // What the lost lines would have said is in this one: the guest's serial output.
    assert!(value["vcpu"]["exit_io_out"].as_u64().unwrap() > 0, "{line}");
}
