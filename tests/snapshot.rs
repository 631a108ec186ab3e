//! Snapshots: pause a counting test guest, snapshot it, kill flick, restore in a new process and
//! check it continues; bad snapshot files are refused without touching anything.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::*;

/// A snapshot taken of a counting guest, and the last count it printed before the pause.
struct Taken {
    dir: TempDir,
    state: PathBuf,
    mem: PathBuf,
    /// The last `count:` line printed in full before the snapshot.
    last_count: u64,
    /// What the guest printed after its last newline before it was paused: the start of a line it
    /// finishes after the restore (under a slow host the pause can land in the middle of a line).
    partial_line: String,
}

fn spawn_api(dir: &TempDir, tag: &str) -> (Child, PathBuf, PathBuf) {
    let sock = dir.path(&format!("{tag}.sock"));
    let stdout = dir.path(&format!("{tag}.out"));
    let child = Command::new(flick_bin())
        .arg("--api-sock")
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout).unwrap())
        .stderr(std::fs::File::create(dir.path(&format!("{tag}.err"))).unwrap())
        .spawn()
        .unwrap();
    wait_for_socket(&sock);
    (child, sock, stdout)
}

fn put(sock: &Path, path: &str, body: &serde_json::Value) {
    let (status, answer) = api_call(sock, "PUT", path, Some(&body.to_string()));
    assert_eq!(status, 204, "PUT {path}: {answer}");
}

fn last_count(text: &str) -> u64 {
    text.lines()
        .filter_map(|l| l.strip_prefix("count: "))
        .filter_map(|n| n.trim().parse().ok())
        .next_back()
        .unwrap_or(0)
}

/// `PATCH /vm` to `state` (Paused or Resumed).
fn set_state(sock: &Path, state: &str) {
    let body = format!(r#"{{"state": "{state}"}}"#);
    let (status, answer) = api_call(sock, "PATCH", "/vm", Some(&body));
    assert_eq!(status, 204, "{answer}");
}

/// Pauses a counting guest: the last `count:` line printed in full, and what it printed after
/// its last newline.
fn pause_counting(sock: &Path, stdout: &Path) -> (u64, String) {
    set_state(sock, "Paused");
    std::thread::sleep(std::time::Duration::from_millis(20));
    let printed = std::fs::read_to_string(stdout).unwrap();
    let complete = printed.rfind('\n').map_or(0, |i| i + 1);
    (
        last_count(&printed[..complete]),
        printed[complete..].to_string(),
    )
}

fn take_snapshot(guest_args: &str, drive: Option<&Path>) -> Taken {
    let dir = TempDir::new("snap");
    let (mut child, sock, stdout) = spawn_api(&dir, "source");
    let args = format!("tg.smp=0 tg.quiet=1 tg.delay_ms=10 {guest_args}");
    put(
        &sock,
        "/boot-source",
        &serde_json::json!({"kernel_image_path": test_guest(), "boot_args": args}),
    );
    put(
        &sock,
        "/machine-config",
        &serde_json::json!({"vcpu_count": 1, "mem_size_mib": 64}),
    );
    if let Some(disk) = drive {
        put(
            &sock,
            "/drives/disk",
            &serde_json::json!({"drive_id": "disk", "path_on_host": disk,
                                "is_root_device": false, "is_read_only": false,
                                "cache_type": "Writeback"}),
        );
    }
    put(
        &sock,
        "/actions",
        &serde_json::json!({"action_type": "InstanceStart"}),
    );
    wait_for_text(&stdout, "count: 5\n");
    let (last, partial_line) = pause_counting(&sock, &stdout);
    let state = dir.path("vm.state");
    let mem = dir.path("vm.mem");
    put(
        &sock,
        "/snapshot/create",
        &serde_json::json!({"snapshot_path": state, "mem_file_path": mem}),
    );
    child.kill().unwrap();
    child.wait().unwrap();
    Taken {
        dir,
        state,
        mem,
        last_count: last,
        partial_line,
    }
}

/// `flick --no-api --restore-snapshot ... --resume`, output to files in `dir`.
fn restore(dir: &TempDir, tag: &str, state: &Path, mem: &Path) -> (Child, PathBuf) {
    let stdout = dir.path(&format!("{tag}.out"));
    let child = Command::new(flick_bin())
        .args(["--no-api", "--resume", "--restore-snapshot"])
        .arg(state)
        .arg("--restore-mem")
        .arg(mem)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout).unwrap())
        .stderr(std::fs::File::create(dir.path(&format!("{tag}.err"))).unwrap())
        .spawn()
        .unwrap();
    (child, stdout)
}

#[test]
fn restored_guest_continues_counting_where_it_stopped() {
    if !kvm_available() {
        return;
    }
    let snap = take_snapshot("tg.count=100000 tg.exit=halt", None);
    let (mut child, stdout) = restore(&snap.dir, "restored", &snap.state, &snap.mem);
    let next = snap.last_count + 1;
    let text = wait_for_text(&stdout, &format!("count: {}\n", next + 2));
    child.kill().unwrap();
    child.wait().unwrap();
    let text = format!("{}{text}", snap.partial_line);
    let first = text
        .lines()
        .find_map(|l| l.strip_prefix("count: "))
        .unwrap_or_default();
    assert_eq!(first, next.to_string(), "restored output: {text}");
}

#[test]
fn the_same_snapshot_restored_twice_at_once_gives_two_independent_vms() {
    if !kvm_available() {
        return;
    }
    let snap = take_snapshot("tg.count=100000 tg.exit=halt", None);
    let (mut a, out_a) = restore(&snap.dir, "a", &snap.state, &snap.mem);
    let (mut b, out_b) = restore(&snap.dir, "b", &snap.state, &snap.mem);
    let target = format!("count: {}\n", snap.last_count + 5);
    let text_a = wait_for_text(&out_a, &target);
    let text_b = wait_for_text(&out_b, &target);
    for child in [&mut a, &mut b] {
        child.kill().unwrap();
        child.wait().unwrap();
    }
    let first = format!("count: {}\n", snap.last_count + 1);
    for text in [text_a, text_b] {
        let text = format!("{}{text}", snap.partial_line);
        assert!(text.starts_with(&first), "{text}");
    }
}

#[test]
fn disk_keeps_working_after_restore() {
    if !kvm_available() {
        return;
    }
    let disk_dir = TempDir::new("snapdisk");
    let disk = disk_dir.write("disk.img", &vec![0u8; 64 * 512]);
    let snap = take_snapshot(
        "tg.count=40 tg.blk=check tg.blk_late=1 tg.exit=reboot",
        Some(&disk),
    );
    let (mut child, stdout) = restore(&snap.dir, "restored", &snap.state, &snap.mem);
    let code = wait_with_timeout(&mut child, VM_TIMEOUT);
    let text = std::fs::read_to_string(&stdout).unwrap();
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("blk0: write ok"), "{text}");
    assert!(text.contains("blk0: readback ok"), "{text}");
    assert!(text.contains("testguest: done"), "{text}");
}

fn assert_restore_refused(state: &Path, mem: &Path, needle: &str) {
    let before = (
        std::fs::read(state).unwrap(),
        std::fs::metadata(mem).unwrap().len(),
    );
    let mem_head = std::fs::read(mem).unwrap();
    let mut cmd = Command::new(flick_bin());
    cmd.args(["--no-api", "--resume", "--restore-snapshot"])
        .arg(state)
        .arg("--restore-mem")
        .arg(mem);
    let out = run_command(cmd, b"");
    assert_eq!(out.code, Some(1), "{out:#?}");
    assert_one_line_error(&out, needle);
    assert_eq!(
        std::fs::read(state).unwrap(),
        before.0,
        "state file modified"
    );
    assert_eq!(
        std::fs::read(mem).unwrap(),
        mem_head,
        "memory file modified"
    );
}

fn flick_output(args: &[&str]) -> std::process::Output {
    std::process::Command::new(flick_bin())
        .args(args)
        .output()
        .expect("run flick")
}

#[test]
fn snapshot_versions_are_printed_for_this_flick_and_for_a_file() {
    let own = flick_output(&["--snapshot-version"]);
    assert!(own.status.success(), "{own:?}");
    let own = String::from_utf8(own.stdout).unwrap();
    assert!(
        own.trim().starts_with('v') && own.trim().ends_with(".0.0"),
        "{own}"
    );
    if !kvm_available() {
        return;
    }
    let snap = take_snapshot("tg.count=100000 tg.exit=halt", None);
    let path = snap.state.display().to_string();
    let described = flick_output(&["--describe-snapshot", &path]);
    assert!(described.status.success(), "{described:?}");
    assert_eq!(String::from_utf8(described.stdout).unwrap(), own);

    // Another format version is described, not refused.
    let mut bytes = std::fs::read(&snap.state).unwrap();
    bytes[8..12].copy_from_slice(&77u32.to_le_bytes());
    let foreign = snap.dir.write("foreign.state", &bytes);
    let described = flick_output(&["--describe-snapshot", &foreign.display().to_string()]);
    assert_eq!(String::from_utf8(described.stdout).unwrap(), "v77.0.0\n");

    for (bytes, needle) in [
        (&b"not a snapshot"[..], "not a flick snapshot state file"),
        (&b"FLICKSNP\x02"[..], "is truncated"),
    ] {
        let bad = snap.dir.write("bad.state", bytes);
        let out = flick_output(&["--describe-snapshot", &bad.display().to_string()]);
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert!(
            stderr.starts_with("flick: error: ") && stderr.contains(needle),
            "{stderr}"
        );
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
    }
}

#[test]
fn bad_snapshot_files_are_refused_and_left_untouched() {
    if !kvm_available() {
        return;
    }
    let snap = take_snapshot("tg.count=100000 tg.exit=halt", None);
    let good = std::fs::read(&snap.state).unwrap();

    let corrupted = snap.dir.path("corrupted.state");
    let mut bytes = good.clone();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&corrupted, &bytes).unwrap();
    assert_restore_refused(&corrupted, &snap.mem, "corrupted (checksum mismatch)");

    let truncated = snap.dir.path("truncated.state");
    std::fs::write(&truncated, &good[..good.len() / 3]).unwrap();
    assert_restore_refused(&truncated, &snap.mem, "is truncated");

    let foreign = snap.dir.path("foreign.state");
    let mut bytes = good.clone();
    bytes[8..12].copy_from_slice(&77u32.to_le_bytes());
    std::fs::write(&foreign, &bytes).unwrap();
    assert_restore_refused(&foreign, &snap.mem, "format version 77");

    let not_a_snapshot = snap
        .dir
        .write("garbage.state", b"this is not a snapshot at all");
    assert_restore_refused(
        &not_a_snapshot,
        &snap.mem,
        "not a flick snapshot state file",
    );

    // A memory file from another snapshot.
    let other = take_snapshot("tg.count=100000 tg.exit=halt", None);
    assert_restore_refused(&snap.state, &other.mem, "does not belong to state file");

    // State and memory swapped.
    assert_restore_refused(&snap.mem, &snap.state, "not a flick snapshot state file");
}

#[test]
fn load_options_flick_does_not_implement_are_refused_at_once() {
    let dir = TempDir::new("snapopts");
    let (mut child, sock, _) = spawn_api(&dir, "vm");
    for (extra, needle) in [(
        serde_json::json!({"clock_realtime": true}),
        "clock_realtime",
    )] {
        let mut load = serde_json::json!({"snapshot_path": dir.path("x"),
            "mem_backend": {"backend_type": "File", "backend_path": dir.path("y")}});
        for (k, v) in extra.as_object().unwrap() {
            load[k] = v.clone();
        }
        let (status, body) = api_call(&sock, "PUT", "/snapshot/load", Some(&load.to_string()));
        assert_eq!(status, 400, "{body}");
        assert!(body.contains(needle), "{body}");
    }
    // `clock_realtime: false` is Firecracker's default and what flick does.
    let load = serde_json::json!({"snapshot_path": dir.path("x"), "clock_realtime": false,
        "mem_backend": {"backend_type": "File", "backend_path": dir.path("y")}});
    let (status, body) = api_call(&sock, "PUT", "/snapshot/load", Some(&load.to_string()));
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("cannot read"),
        "the files are missing, nothing else: {body}"
    );
    child.kill().unwrap();
    child.wait().unwrap();
}

#[test]
fn snapshot_of_a_running_vm_and_load_into_a_configured_vmm_are_refused() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("snaprefuse");
    let (mut child, sock, _) = spawn_api(&dir, "vm");
    let boot = serde_json::json!({"kernel_image_path": test_guest(), "boot_args": "tg.exit=halt"});
    put(&sock, "/boot-source", &boot);
    let load = serde_json::json!({"snapshot_path": dir.path("x"),
        "mem_backend": {"backend_type": "File", "backend_path": dir.path("y")}});
    let (status, body) = api_call(&sock, "PUT", "/snapshot/load", Some(&load.to_string()));
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("fresh flick"), "{body}");
    put(
        &sock,
        "/actions",
        &serde_json::json!({"action_type": "InstanceStart"}),
    );
    let create =
        serde_json::json!({"snapshot_path": dir.path("s"), "mem_file_path": dir.path("m")});
    let (status, body) = api_call(&sock, "PUT", "/snapshot/create", Some(&create.to_string()));
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("paused"), "{body}");
    assert!(!dir.path("s").exists() && !dir.path("m").exists());
    child.kill().unwrap();
    child.wait().unwrap();
}

/// Bytes of RAM in a memory file (its trailer left out) and the bytes the file system holds for
/// it (its allocated blocks).
fn ram_and_allocated(mem: &Path) -> (Vec<u8>, u64) {
    use std::os::unix::fs::MetadataExt;
    let mut bytes = std::fs::read(mem).unwrap();
    bytes.truncate(bytes.len() - 4096);
    (bytes, std::fs::metadata(mem).unwrap().blocks() * 512)
}

fn rebase_snap(base: &Path, diff: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_flick-rebase-snap"))
        .arg("--base-file")
        .arg(base)
        .arg("--diff-file")
        .arg(diff)
        .output()
        .unwrap()
}

fn snapshot_now(sock: &Path, dir: &TempDir, name: &str, kind: &str) -> (PathBuf, PathBuf) {
    let (state, mem) = (
        dir.path(&format!("{name}.state")),
        dir.path(&format!("{name}.mem")),
    );
    put(
        sock,
        "/snapshot/create",
        &serde_json::json!({"snapshot_path": state, "mem_file_path": mem, "snapshot_type": kind}),
    );
    (state, mem)
}

/// With `track_dirty_pages`, a full snapshot, then two diffs: one after the guest counted on
/// (its own writes: KVM's dirty log), one after it read a drive (the device's writes into guest
/// memory: vm-memory's bitmap). Merged in order onto the full one with flick-rebase-snap, they
/// give exactly the memory of a full snapshot taken at the same moment as the last diff; the
/// first merge restores and the guest counts on from there.
#[test]
fn diff_snapshots_hold_the_written_pages_and_merge_into_full_ones() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("snapdiff");
    let mut data = vec![0u8; 1 << 20];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for b in &mut data {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x.to_le_bytes()[3];
    }
    let disk = dir.write("disk.img", &data);
    let (mut child, sock, stdout) = spawn_api(&dir, "source");
    let args = "tg.smp=0 tg.quiet=1 tg.count=8 tg.delay_ms=250 tg.blk=read tg.blk_late=1 \
                tg.blk_count=64 tg.exit=halt";
    put(
        &sock,
        "/boot-source",
        &serde_json::json!({"kernel_image_path": test_guest(), "boot_args": args}),
    );
    put(
        &sock,
        "/machine-config",
        &serde_json::json!({"vcpu_count": 1, "mem_size_mib": 64, "track_dirty_pages": true}),
    );
    put(
        &sock,
        "/drives/disk",
        &serde_json::json!({"drive_id": "disk", "path_on_host": disk,
                            "is_root_device": false, "is_read_only": true}),
    );
    put(
        &sock,
        "/actions",
        &serde_json::json!({"action_type": "InstanceStart"}),
    );
    wait_for_text(&stdout, "count: 2\n");
    set_state(&sock, "Paused");
    let (_, full_mem) = snapshot_now(&sock, &dir, "full", "Full");
    set_state(&sock, "Resumed");
    wait_for_text(&stdout, "count: 4\n");
    set_state(&sock, "Paused");
    let printed = std::fs::read_to_string(&stdout).unwrap();
    let (diff1_state, diff1_mem) = snapshot_now(&sock, &dir, "diff1", "Diff");
    set_state(&sock, "Resumed");
    let done = wait_for_text(&stdout, "testguest: done\n");
    set_state(&sock, "Paused");
    let (_, diff2_mem) = snapshot_now(&sock, &dir, "diff2", "Diff");
    let (_, now_mem) = snapshot_now(&sock, &dir, "now", "Full");
    child.kill().unwrap();
    child.wait().unwrap();
    let crc = done
        .lines()
        .find(|l| l.starts_with("blk0: read sectors=0-63 crc="))
        .unwrap_or_else(|| panic!("no blk0 read line: {done}"))
        .to_string();

    // Only written pages are in the diffs: far less than a full snapshot holds.
    let (_, full_bytes) = ram_and_allocated(&full_mem);
    let (_, diff1_bytes) = ram_and_allocated(&diff1_mem);
    let (_, diff2_bytes) = ram_and_allocated(&diff2_mem);
    let (now_ram, now_bytes) = ram_and_allocated(&now_mem);
    eprintln!(
        "allocated: full {full_bytes} B, diff after counting {diff1_bytes} B, diff after the \
         drive read {diff2_bytes} B, full again {now_bytes} B"
    );
    // (How much more than the counting and the drive read themselves wrote depends on the
    // host: with hardware virtualization the CPU's accessed and dirty bits in the guest's page
    // tables are writes too.)
    assert!(
        diff1_bytes > 0 && diff1_bytes * 2 < full_bytes,
        "{diff1_bytes} vs {full_bytes}"
    );
    // The drive read alone wrote 32 KiB into guest memory.
    assert!(
        diff2_bytes >= 32 << 10 && diff2_bytes < now_bytes,
        "{diff2_bytes} vs {now_bytes}"
    );

    // A diff memory file alone does not restore, and is no base for another diff.
    assert_restore_refused(&diff1_state, &diff1_mem, "memory file of a diff snapshot");
    let refused = rebase_snap(&diff1_mem, &diff2_mem);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("is itself a diff snapshot"),
        "{refused:?}"
    );

    // full + diff1 restores where diff1 was taken: the guest counts on from 5 and reads the
    // same drive data.
    let merged1 = dir.path("merged1.mem");
    std::fs::copy(&full_mem, &merged1).unwrap();
    let out = rebase_snap(&merged1, &diff1_mem);
    assert!(out.status.success(), "{out:?}");
    let (mut restored, restored_out) = restore(&dir, "restored", &diff1_state, &merged1);
    let after = wait_for_text(&restored_out, "testguest: done\n");
    restored.kill().unwrap();
    restored.wait().unwrap();
    assert!(printed.contains("count: 4\n"), "{printed}");
    assert!(
        after.contains("count: 5\n") && after.contains("count: 8\n"),
        "{after}"
    );
    assert!(!after.contains("count: 4\n"), "counted 4 again: {after}");
    assert!(after.contains(&crc), "{after} (expected {crc})");

    // full + diff1 + diff2 is the memory of the full snapshot taken with diff2.
    let out = rebase_snap(&merged1, &diff2_mem);
    assert!(out.status.success(), "{out:?}");
    let (merged_ram, _) = ram_and_allocated(&merged1);
    assert_eq!(merged_ram.len(), now_ram.len());
    let differing = merged_ram
        .chunks(4096)
        .zip(now_ram.chunks(4096))
        .filter(|(a, b)| a != b)
        .count();
    assert_eq!(
        differing, 0,
        "pages differ between the merged and the full snapshot"
    );
}

#[test]
fn a_diff_snapshot_without_dirty_page_tracking_is_refused() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("snapnodiff");
    let (mut child, sock, _) = spawn_api(&dir, "vm");
    put(
        &sock,
        "/boot-source",
        &serde_json::json!({"kernel_image_path": test_guest(), "boot_args": "tg.exit=halt tg.smp=0"}),
    );
    put(
        &sock,
        "/actions",
        &serde_json::json!({"action_type": "InstanceStart"}),
    );
    set_state(&sock, "Paused");
    let body = serde_json::json!({"snapshot_path": dir.path("s"), "mem_file_path": dir.path("m"),
                                  "snapshot_type": "Diff"});
    let (status, answer) = api_call(&sock, "PUT", "/snapshot/create", Some(&body.to_string()));
    assert_eq!(status, 400, "{answer}");
    assert!(answer.contains("track_dirty_pages"), "{answer}");
    assert!(!dir.path("m").exists() && !dir.path("s").exists());
    child.kill().unwrap();
    child.wait().unwrap();
}

/// A restored VM snapshotted again (a full snapshot: its RAM is the first memory file, mapped
/// privately, of which it touched only some pages) restores once more and counts on.
#[test]
fn a_snapshot_of_a_restored_vm_restores_again() {
    if !kvm_available() {
        return;
    }
    let snap = take_snapshot("tg.count=100000 tg.exit=halt", None);
    let (mut child, sock, stdout) = spawn_api(&snap.dir, "second");
    put(
        &sock,
        "/snapshot/load",
        &serde_json::json!({"snapshot_path": snap.state,
            "mem_backend": {"backend_type": "File", "backend_path": snap.mem},
            "resume_vm": true}),
    );
    let next = snap.last_count + 3;
    wait_for_text(&stdout, &format!("count: {next}\n"));
    let (last, partial_line) = pause_counting(&sock, &stdout);
    let (state, mem) = snapshot_now(&sock, &snap.dir, "again", "Full");
    child.kill().unwrap();
    child.wait().unwrap();
    // Every page that held data in the first snapshot still does (the restored guest counting
    // zeroes no page), including those it never touched after the restore: boot structures,
    // the command line.
    let (first_ram, _) = ram_and_allocated(&snap.mem);
    let (again_ram, _) = ram_and_allocated(&mem);
    let lost = first_ram
        .chunks(4096)
        .zip(again_ram.chunks(4096))
        .filter(|(a, b)| a.iter().any(|&x| x != 0) && b.iter().all(|&x| x == 0))
        .count();
    assert_eq!(
        lost, 0,
        "pages with data in the first snapshot are zero in the second"
    );
    let (mut third, out) = restore(&snap.dir, "third", &state, &mem);
    let text = wait_for_text(&out, &format!("count: {}\n", last + 2));
    third.kill().unwrap();
    third.wait().unwrap();
    let text = format!("{partial_line}{text}");
    let first = text
        .lines()
        .find_map(|l| l.strip_prefix("count: "))
        .unwrap_or_default();
    assert_eq!(first, (last + 1).to_string(), "{text}");
}

#[path = "../examples/uffd_handler.rs"]
mod uffd_handler;

/// `mem_backend: Uffd`: the example page server (examples/uffd_handler.rs) receives the
/// userfaultfd and the regions, serves every page from the memory file, and the guest counts on;
/// the server sees the connection close when flick ends.
#[test]
fn a_snapshot_loads_through_the_example_uffd_page_server() {
    if !kvm_available() {
        return;
    }
    let snap = take_snapshot("tg.count=100000 tg.exit=halt", None);
    let socket = snap.dir.path("pages.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let mem = std::fs::File::open(&snap.mem).unwrap();
    let server = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let (uffd, regions) = uffd_handler::receive(&stream).unwrap();
        let pages = uffd_handler::serve(&stream, &uffd, &regions, &mem).unwrap();
        (regions, pages)
    });
    let (mut child, sock, stdout) = spawn_api(&snap.dir, "restored");
    put(
        &sock,
        "/snapshot/load",
        &serde_json::json!({"snapshot_path": snap.state,
            "mem_backend": {"backend_type": "Uffd", "backend_path": socket},
            "resume_vm": true}),
    );
    let next = snap.last_count + 1;
    let text = wait_for_text(&stdout, &format!("count: {}\n", next + 2));
    child.kill().unwrap();
    child.wait().unwrap();
    let (regions, pages) = server.join().unwrap();
    let text = format!("{}{text}", snap.partial_line);
    let first = text
        .lines()
        .find_map(|l| l.strip_prefix("count: "))
        .unwrap_or_default();
    assert_eq!(first, next.to_string(), "restored output: {text}");
    // 64 MiB of guest RAM in one region at file offset 0; the guest touched a few pages.
    assert_eq!(regions.len(), 1);
    assert_eq!(
        (regions[0].size, regions[0].offset, regions[0].page_size),
        (64 << 20, 0, 4096)
    );
    assert!(pages > 0 && pages < 4096, "{pages} pages served");
}

#[test]
fn a_uffd_load_without_a_page_server_is_refused() {
    if !kvm_available() {
        return;
    }
    let dir = TempDir::new("uffdnone");
    let (mut child, sock, _) = spawn_api(&dir, "vm");
    let snap = take_snapshot("tg.count=100000 tg.exit=halt", None);
    let load = serde_json::json!({"snapshot_path": snap.state,
        "mem_backend": {"backend_type": "Uffd", "backend_path": dir.path("nobody.sock")}});
    let (status, body) = api_call(&sock, "PUT", "/snapshot/load", Some(&load.to_string()));
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("cannot connect to the UFFD page server"),
        "{body}"
    );
    child.kill().unwrap();
    child.wait().unwrap();
}
