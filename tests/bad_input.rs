//! Bad input of every kind ends flick with one clear line on stderr and a non-zero exit code,
//! never a panic or a hang.

mod common;

use std::process::Command;

use common::*;

fn config_with(kernel: &std::path::Path, vcpus: u64, mem: u64) -> serde_json::Value {
    serde_json::json!({
        "boot-source": {"kernel_image_path": kernel},
        "machine-config": {"vcpu_count": vcpus, "mem_size_mib": mem}
    })
}

#[test]
fn missing_kernel_is_reported() {
    let out = run_config(
        &config_with("/nonexistent/vmlinux".as_ref(), 1, 64),
        &[],
        b"",
    );
    assert_one_line_error(&out, "cannot open kernel image /nonexistent/vmlinux");
}

#[test]
fn kernel_that_is_a_directory_is_reported() {
    let dir = TempDir::new("kdir");
    let out = run_config(&config_with(&dir.0, 1, 64), &[], b"");
    assert_one_line_error(&out, "not a regular file");
}

#[test]
fn garbage_kernel_is_reported() {
    let dir = TempDir::new("garbage");
    let kernel = dir.write("vmlinux", &[0xa5; 8192]);
    let out = run_config(&config_with(&kernel, 1, 64), &[], b"");
    assert_one_line_error(&out, "neither an ELF vmlinux nor a bzImage");
}

#[test]
fn truncated_elf_kernel_is_reported() {
    let dir = TempDir::new("trunc");
    let full = std::fs::read(test_guest()).unwrap();
    let kernel = dir.write("vmlinux", &full[..200]);
    let out = run_config(&config_with(&kernel, 1, 64), &[], b"");
    assert_one_line_error(&out, "cannot load kernel image");
}

#[test]
fn initrd_larger_than_guest_memory_is_reported() {
    let dir = TempDir::new("initrd");
    let initrd = dir.path("initrd");
    std::fs::File::create(&initrd)
        .unwrap()
        .set_len(80 << 20)
        .unwrap();
    let config = serde_json::json!({
        "boot-source": {"kernel_image_path": test_guest(), "initrd_path": initrd},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 64}
    });
    let out = run_config(&config, &[], b"");
    assert_one_line_error(&out, "does not fit in guest memory");
}

#[test]
fn zero_vcpus_are_refused() {
    let out = run_config(&config_with(&test_guest(), 0, 64), &[], b"");
    assert_one_line_error(&out, "invalid vcpu_count 0");
}

#[test]
fn thirty_three_vcpus_are_refused() {
    let out = run_config(&config_with(&test_guest(), 33, 64), &[], b"");
    assert_one_line_error(&out, "invalid vcpu_count 33");
}

#[test]
fn zero_memory_is_refused() {
    let out = run_config(&config_with(&test_guest(), 1, 0), &[], b"");
    assert_one_line_error(&out, "invalid mem_size_mib 0");
}

#[test]
fn memory_beyond_the_host_is_refused() {
    let out = run_config(&config_with(&test_guest(), 1, 1 << 30), &[], b"");
    assert_one_line_error(&out, "exceeds the host's memory");
}

#[test]
fn malformed_json_is_reported_with_its_position() {
    let dir = TempDir::new("json");
    let path = dir.write("vm.json", b"{\"boot-source\": {\"kernel_image_path\": }");
    let mut cmd = Command::new(flick_bin());
    cmd.args(["--no-api", "--config-file"]).arg(&path);
    let out = run_command(cmd, b"");
    assert_one_line_error(&out, "line 1 column");
}

#[test]
fn unknown_config_field_is_named() {
    let config = serde_json::json!({
        "boot-source": {"kernel_image_path": test_guest(), "boot_argz": "x"}
    });
    let out = run_config(&config, &[], b"");
    assert_one_line_error(&out, "boot_argz");
}

#[test]
fn missing_config_file_is_reported() {
    let mut cmd = Command::new(flick_bin());
    cmd.args(["--no-api", "--config-file", "/nonexistent/vm.json"]);
    let out = run_command(cmd, b"");
    assert_one_line_error(&out, "cannot read config file /nonexistent/vm.json");
}

#[test]
fn missing_dev_kvm_is_reported() {
    if !kvm_available() {
        return;
    }
    // Hide /dev in a private mount namespace.
    let config = config_with(&test_guest(), 1, 64);
    let dir = TempDir::new("nokvm");
    let path = dir.write("vm.json", config.to_string().as_bytes());
    let script = format!(
        "mount -t tmpfs none /dev && exec {} --no-api --config-file {}",
        flick_bin(),
        path.display()
    );
    let mut cmd = Command::new("unshare");
    cmd.args(["-m", "--propagation", "private", "sh", "-c", &script]);
    let out = run_command(cmd, b"");
    assert_one_line_error(&out, "cannot open /dev/kvm");
}

#[test]
fn dev_kvm_without_permission_is_reported() {
    if !kvm_available() {
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipping: needs root to drop to an unprivileged user");
        return;
    }
    let dir = TempDir::new("noperm");
    let kernel = dir.path("vmlinux");
    std::fs::copy(test_guest(), &kernel).unwrap();
    let path = dir.write(
        "vm.json",
        config_with(&kernel, 1, 64).to_string().as_bytes(),
    );
    let mut perms = std::fs::metadata(&dir.0).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&dir.0, perms).unwrap();
    // Run as `nobody`, who may not open the root-only /dev/kvm.
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        flick_bin(),
    ])
    .args(["--no-api", "--config-file"])
    .arg(&path);
    let out = run_command(cmd, b"");
    if out.stderr.contains("Permission denied") && out.stderr.contains(flick_bin()) {
        eprintln!("skipping: the flick binary is not executable by nobody here");
        return;
    }
    assert_one_line_error(&out, "cannot open /dev/kvm");
}

fn config_with_drive(path: &std::path::Path, read_only: bool) -> serde_json::Value {
    serde_json::json!({
        "boot-source": {"kernel_image_path": test_guest()},
        "drives": [{"drive_id": "data", "path_on_host": path, "is_root_device": false,
                    "is_read_only": read_only}]
    })
}

#[test]
fn missing_drive_file_is_reported() {
    let out = run_config(
        &config_with_drive("/nonexistent/disk.img".as_ref(), false),
        &[],
        b"",
    );
    assert_one_line_error(&out, "drive data: cannot open /nonexistent/disk.img");
}

#[test]
fn drive_io_engine_async_is_refused_not_ignored() {
    let dir = TempDir::new("asyncdrive");
    let disk = dir.write("disk.img", &[0u8; 4096]);
    let mut config = config_with_drive(&disk, false);
    config["drives"][0]["io_engine"] = "Async".into();
    let out = run_config(&config, &[], b"");
    assert_one_line_error(&out, "io_engine Async");
}

#[test]
fn empty_drive_file_is_reported() {
    let dir = TempDir::new("emptydisk");
    let disk = dir.write("disk.img", b"");
    let out = run_config(&config_with_drive(&disk, false), &[], b"");
    assert_one_line_error(&out, "is empty");
}

#[test]
fn drive_that_is_a_directory_is_reported() {
    let dir = TempDir::new("dirdisk");
    let out = run_config(&config_with_drive(&dir.0, true), &[], b"");
    assert_one_line_error(&out, "not a regular file");
}

#[test]
fn drive_locked_by_another_process_is_reported() {
    let dir = TempDir::new("lockeddisk");
    let disk = dir.write("disk.img", &[0u8; 4096]);
    let holder = std::fs::File::open(&disk).unwrap();
    // SAFETY: flock on a file this test owns.
    let rc = unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&holder), libc::LOCK_EX) };
    assert_eq!(rc, 0);
    let out = run_config(&config_with_drive(&disk, false), &[], b"");
    assert_one_line_error(&out, "locked by another process");
}
