//! Booting the test guests on KVM through the config file: both entry protocols, the memory map,
//! SMP, serial in and out, the boot timer, reset and guest faults.

mod common;

use common::*;

#[test]
fn linux64_guest_boots_sees_its_cmdline_and_resets_cleanly() {
    if !kvm_available() {
        return;
    }
    let mut config = guest_config(&test_guest(), "tg.count=2 hello=world", 1, 64);
    config["machine-config"]["cpu_profile"] = "host".into();
    let out = run_config(&config, &[], b"");
    out.assert_clean_exit();
    assert_eq!(
        out.line_starting("testguest: start"),
        Some("testguest: start protocol=linux64")
    );
    assert_eq!(
        out.line_starting("cmdline:"),
        Some("cmdline: tg.count=2 hello=world")
    );
    assert!(out.stdout.contains("count: 1\ncount: 2\n"), "{out:#?}");
}

#[test]
fn pvh_guest_enters_through_the_pvh_note() {
    if !kvm_available() {
        return;
    }
    let out = run_config(
        &guest_config(&test_guest_pvh(), "tg.smp=0", 1, 64),
        &[],
        b"",
    );
    out.assert_clean_exit();
    assert_eq!(
        out.line_starting("testguest: start"),
        Some("testguest: start protocol=pvh")
    );
}

#[test]
fn memory_map_covers_guest_ram_exactly() {
    if !kvm_available() {
        return;
    }
    let out = run_config(&guest_config(&test_guest(), "tg.smp=0", 1, 128), &[], b"");
    out.assert_clean_exit();
    // 128 MiB minus the legacy hole between the EBDA (0x9fc00) and 1 MiB.
    let expected_kib = (128 * 1024) - (0x100000 - 0x9fc00) / 1024;
    assert_eq!(
        out.line_starting("mem:"),
        Some(&*format!("mem: usable={expected_kib} KiB"))
    );
    assert!(
        out.stdout.contains("e820: 0x100000-0x8000000 type=1"),
        "{out:#?}"
    );
}

#[test]
fn large_guest_memory_skips_the_mmio_hole() {
    if !kvm_available() {
        return;
    }
    let out = run_config(
        &guest_config(&test_guest(), "tg.smp=0", 1, 4096 + 512),
        &[],
        b"",
    );
    out.assert_clean_exit();
    assert!(
        out.stdout.contains("e820: 0x100000-0xc0000000 type=1"),
        "{out:#?}"
    );
    assert!(
        out.stdout.contains("e820: 0x100000000-0x160000000 type=1"),
        "{out:#?}"
    );
}

#[test]
fn four_vcpus_are_announced_and_all_come_online() {
    if !kvm_available() {
        return;
    }
    let out = run_config(&guest_config(&test_guest(), "", 4, 64), &[], b"");
    out.assert_clean_exit();
    assert_eq!(
        out.line_starting("mptable:"),
        Some("mptable: cpus=4 apic_ids=0,1,2,3")
    );
    assert_eq!(
        out.line_starting("smp:"),
        Some("smp: online=4/4 apic_ids=0,1,2,3")
    );
}

#[test]
fn thirty_two_vcpus_come_online() {
    if !kvm_available() {
        return;
    }
    let out = run_config(&guest_config(&test_guest_pvh(), "", 32, 64), &[], b"");
    out.assert_clean_exit();
    let smp = out.line_starting("smp:").unwrap_or_default();
    assert!(smp.starts_with("smp: online=32/32"), "{out:#?}");
}

#[test]
fn boot_timer_write_is_logged_in_firecracker_format() {
    if !kvm_available() {
        return;
    }
    let out = run_config(
        &guest_config(&test_guest(), "tg.smp=0", 1, 64),
        // The default level is Info, as Firecracker's: the flag alone logs the line.
        &["--boot-timer"],
        b"",
    );
    out.assert_clean_exit();
    let line = out
        .stderr
        .lines()
        .find(|l| l.contains("Guest-boot-time ="))
        .unwrap_or_default();
    assert!(
        line.contains(" us ") && line.contains(" CPU ms"),
        "{out:#?}"
    );
}

#[test]
fn log_level_and_module_filter_what_is_logged() {
    if !kvm_available() {
        return;
    }
    let config = guest_config(&test_guest(), "tg.smp=0", 1, 64);
    let quiet = run_config(&config, &["--boot-timer", "--level", "Warning"], b"");
    quiet.assert_clean_exit();
    assert!(!quiet.stderr.contains("Guest-boot-time"), "{quiet:#?}");
    // The boot-timer line comes from the boot-timer device's module; the start-up line
    // ("flick v... on ...") from main's.
    let only_device = run_config(&config, &["--boot-timer", "--module", "devices"], b"");
    only_device.assert_clean_exit();
    assert!(
        only_device.stderr.contains("Guest-boot-time"),
        "{only_device:#?}"
    );
    assert!(!only_device.stderr.contains("flick v"), "{only_device:#?}");
    let only_main = run_config(&config, &["--boot-timer", "--module", "flick::vmm"], b"");
    only_main.assert_clean_exit();
    assert!(
        !only_main.stderr.contains("Guest-boot-time"),
        "{only_main:#?}"
    );
}

#[test]
fn enable_pci_is_refused_at_once() {
    let out = run_config(&serde_json::json!({}), &["--enable-pci"], b"");
    assert_one_line_error(&out, "--enable-pci");
}

#[test]
fn boot_timer_line_is_absent_without_the_flag() {
    if !kvm_available() {
        return;
    }
    let out = run_config(
        &guest_config(&test_guest(), "tg.smp=0", 1, 64),
        &["--level", "Info"],
        b"",
    );
    out.assert_clean_exit();
    assert!(!out.stderr.contains("Guest-boot-time"), "{out:#?}");
}

#[test]
fn console_input_reaches_the_guest() {
    if !kvm_available() {
        return;
    }
    let out = run_config(
        &guest_config(&test_guest(), "tg.smp=0 tg.echo=1", 1, 64),
        &[],
        b"ping 123\nquit\n",
    );
    out.assert_clean_exit();
    assert!(out.stdout.contains("ping 123"), "{out:#?}");
    assert!(out.stdout.contains("echo: done"), "{out:#?}");
}

#[test]
fn console_input_longer_than_the_uart_fifo_arrives_whole_while_stdin_stays_open() {
    if !kvm_available() {
        return;
    }
    use std::io::Write as _;
    // One write far beyond the 64-byte receive FIFO and one read(2), with the writer still
    // attached (as a person typing or a script pasting): every byte must reach the guest
    // without waiting for more input or for end of file.
    let mut input = Vec::new();
    let mut lines = Vec::new();
    for i in 0..20 {
        let line = format!("line{i:02} {}", "abcdefghij".repeat(30));
        input.extend_from_slice(line.as_bytes());
        input.push(b'\n');
        lines.push(line);
    }
    let dir = TempDir::new("console-in");
    let config = guest_config(&test_guest(), "tg.smp=0 tg.echo=1", 1, 64);
    let path = dir.write("vm.json", config.to_string().as_bytes());
    let console = dir.path("console");
    let mut child = std::process::Command::new(flick_bin())
        .arg("--no-api")
        .arg("--config-file")
        .arg(&path)
        .stdin(std::process::Stdio::piped())
        .stdout(std::fs::File::create(&console).unwrap())
        .stderr(std::fs::File::create(dir.path("log")).unwrap())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    wait_for_text(&console, "echo: ready");
    stdin.write_all(&input).unwrap();
    stdin.flush().unwrap();
    let text = wait_for_text(&console, lines.last().unwrap());
    for line in &lines {
        assert!(text.contains(line.as_str()), "{line:?} missing: {text}");
    }
    stdin.write_all(b"quit\n").unwrap();
    drop(stdin);
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(std::fs::read_to_string(&console)
        .unwrap()
        .contains("echo: done"));
}

#[test]
fn triple_fault_is_reported_with_rip_and_nonzero_exit() {
    if !kvm_available() {
        return;
    }
    let out = run_config(
        &guest_config(&test_guest(), "tg.smp=0 tg.exit=fault", 1, 64),
        &[],
        b"",
    );
    assert_eq!(out.code, Some(3), "{out:#?}");
    let line = out
        .stderr
        .lines()
        .find(|l| l.contains("triple fault"))
        .unwrap_or_default();
    assert!(line.contains("RIP 0x"), "{out:#?}");
    assert!(line.contains("instruction bytes"), "{out:#?}");
}

#[test]
fn log_path_receives_the_log_instead_of_stderr() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("log");
    let log = dir.path("flick.log");
    let log_arg = log.to_str().unwrap();
    let out = run_config(
        &guest_config(&test_guest(), "tg.smp=0", 1, 64),
        &[
            "--boot-timer",
            "--level",
            "Info",
            "--log-path",
            log_arg,
            "--id",
            "vm_7",
        ],
        b"",
    );
    out.assert_clean_exit();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("[vm_7:"), "{text}");
    assert!(text.contains("Guest-boot-time"), "{text}");
    assert!(!out.stderr.contains("Guest-boot-time"), "{out:#?}");
}

#[test]
fn conservative_profile_on_pvm_hides_features_on_the_command_line() {
    if !kvm_available() {
        return;
    }
    let mut config = guest_config(&test_guest(), "tg.smp=0", 1, 64);
    config["machine-config"]["cpu_profile"] = "conservative".into();
    let out = run_config(&config, &[], b"");
    out.assert_clean_exit();
    let cmdline = out.line_starting("cmdline:").unwrap_or_default();
    let on_pvm = std::path::Path::new("/sys/module/kvm_pvm").exists();
    assert_eq!(cmdline.contains("clearcpuid=xsave,"), on_pvm, "{out:#?}");
}

#[test]
fn serial_output_goes_to_serial_out_path_when_configured() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("serialfile");
    let console = dir.path("console.log");
    let mut config = guest_config(&test_guest(), "tg.smp=0 tg.count=2", 1, 64);
    config["serial"] = serde_json::json!({"serial_out_path": console});
    let out = run_config(&config, &[], b"");
    assert_eq!(out.code, Some(0), "{out:#?}");
    assert!(out.stdout.is_empty(), "console leaked to stdout: {out:#?}");
    let text = std::fs::read_to_string(&console).unwrap();
    assert!(
        text.contains("count: 2") && text.contains("testguest: done"),
        "{text}"
    );
}

#[test]
fn serial_rate_limiter_drops_console_output_beyond_its_budget() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("seriallimit");
    let console = dir.path("console.log");
    let mut config = guest_config(&test_guest(), "tg.smp=0 tg.count=200", 1, 64);
    config["serial"] = serde_json::json!({
        "serial_out_path": console,
        // 300 bytes, refilled over 10 minutes: the rest of the run's output is dropped.
        "rate_limiter": {"size": 300, "refill_time": 600000},
    });
    let out = run_config(&config, &[], b"");
    assert_eq!(out.code, Some(0), "{out:#?}");
    let written = std::fs::metadata(&console).unwrap().len();
    assert!(
        (1..=301).contains(&written),
        "{written} bytes reached the console file"
    );
    // Without the limiter the same guest writes far more.
    config["serial"] = serde_json::json!({"serial_out_path": dir.path("full.log")});
    let out = run_config(&config, &[], b"");
    assert_eq!(out.code, Some(0), "{out:#?}");
    let full = std::fs::metadata(dir.path("full.log")).unwrap().len();
    assert!(
        full > 2 * written,
        "{full} bytes unlimited vs {written} limited"
    );
}

#[test]
fn unwritable_serial_out_path_is_a_clear_error() {
    let mut config = guest_config(&test_guest(), "", 1, 64);
    config["serial"] = serde_json::json!({"serial_out_path": "/nonexistent/dir/console.log"});
    let out = run_config(&config, &[], b"");
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert!(
        out.stderr
            .contains("cannot open serial_out_path /nonexistent/dir/console.log"),
        "{out:#?}"
    );
}
