//! Linux guests: the project's kernel and busybox root file system (built and cached by
//! `scripts/guest-artifacts.sh`, which `scripts/test.sh` runs first and whose paths arrive in
//! `FLICK_KERNEL_*`/`FLICK_ROOTFS_EXT4`/`FLICK_INITRAMFS`).
//!
//! On a PVM host (KVM emulating guest kernel code) Linux gets as far as starting init: user space
//! cannot make system calls there, so init dies, the kernel panics and (panic=1, reboot=k) resets
//! through the i8042, and flick exits 0. On hosts where user space works, init prints READY.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const LINUX_TIMEOUT: Duration = Duration::from_secs(300);

fn artifact(var: &str) -> Option<PathBuf> {
    match std::env::var_os(var) {
        Some(path) => Some(PathBuf::from(path)),
        None if std::env::var_os("CI").is_some() => {
            panic!("{var} is not set: run the suite through scripts/test.sh")
        }
        None => {
            eprintln!("skipping: {var} is not set (run scripts/test.sh or eval scripts/guest-artifacts.sh)");
            None
        }
    }
}

fn on_pvm() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

/// Runs a Linux VM to its end (or the timeout), returning exit code and console.
fn run_linux(config: &serde_json::Value) -> (Option<i32>, String, String, Duration) {
    let dir = TempDir::new("linux");
    let path = dir.write("vm.json", config.to_string().as_bytes());
    let start = Instant::now();
    let mut child = Command::new(flick_bin())
        .args([
            "--no-api",
            "--level",
            "Info",
            "--boot-timer",
            "--config-file",
        ])
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(dir.path("console")).unwrap())
        .stderr(std::fs::File::create(dir.path("log")).unwrap())
        .spawn()
        .unwrap();
    let code = wait_with_timeout(&mut child, LINUX_TIMEOUT);
    let console = std::fs::read_to_string(dir.path("console")).unwrap_or_default();
    let log = std::fs::read_to_string(dir.path("log")).unwrap_or_default();
    (code, console, log, start.elapsed())
}

/// The vmlinux and a private copy of the ext4 root file system (guests write to it), in a
/// directory removed with the returned `TempDir`.
fn kernel_and_root_copy(tag: &str) -> Option<(PathBuf, TempDir, PathBuf)> {
    let kernel = artifact("FLICK_KERNEL_VMLINUX")?;
    let rootfs = artifact("FLICK_ROOTFS_EXT4")?;
    let dir = TempDir::new(tag);
    let image = dir.path("rootfs.ext4");
    std::fs::copy(&rootfs, &image).unwrap();
    Some((kernel, dir, image))
}

/// ext4 superblock mount count (offset 1024 + 0x34).
fn ext4_mount_count(image: &std::path::Path) -> u16 {
    let bytes = std::fs::read(image).unwrap();
    u16::from_le_bytes([bytes[1024 + 0x34], bytes[1024 + 0x35]])
}

#[test]
fn linux_mounts_ext4_root_from_virtio_blk_and_starts_init() {
    if !kvm_available() {
        return;
    }
    let Some((kernel, _dir, image)) = kernel_and_root_copy("linuxroot") else {
        return;
    };
    let mounts_before = ext4_mount_count(&image);
    let config = serde_json::json!({
        "boot-source": {"kernel_image_path": kernel,
                        "boot_args": "console=ttyS0 reboot=k panic=1 flick.init=reboot"},
        "drives": [{"drive_id": "rootfs", "path_on_host": image, "is_root_device": true,
                    "is_read_only": false}],
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 256}
    });
    let (code, console, log, elapsed) = run_linux(&config);
    eprintln!("Linux run took {elapsed:?}");
    assert!(
        console.contains("virtio_blk virtio0: [vda]"),
        "{console}\n{log}"
    );
    assert!(
        console.contains("VFS: Mounted root (ext4 filesystem)"),
        "{console}\n{log}"
    );
    assert!(
        console.contains("Run /sbin/init as init process"),
        "{console}\n{log}"
    );
    assert_eq!(
        code,
        Some(0),
        "flick did not exit cleanly: {console}\n{log}"
    );
    assert!(
        ext4_mount_count(&image) > mounts_before,
        "ext4 mount count did not go up"
    );
    if on_pvm() {
        // Documented limit of this host: init cannot make system calls.
        assert!(console.contains("Attempted to kill init"), "{console}");
    } else {
        assert!(console.contains("READY uptime="), "{console}");
        assert!(log.contains("Guest-boot-time"), "{log}");
    }
}

#[test]
fn linux_bzimage_boots_an_initramfs() {
    if !kvm_available() {
        return;
    }
    let (Some(kernel), Some(initrd)) = (
        artifact("FLICK_KERNEL_BZIMAGE"),
        artifact("FLICK_INITRAMFS"),
    ) else {
        return;
    };
    let config = serde_json::json!({
        "boot-source": {"kernel_image_path": kernel, "initrd_path": initrd,
                        "boot_args": "console=ttyS0 reboot=k panic=1 flick.init=reboot"},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 256}
    });
    let (code, console, log, elapsed) = run_linux(&config);
    eprintln!("Linux run took {elapsed:?}");
    assert!(
        console.contains("Run /init as init process"),
        "{console}\n{log}"
    );
    assert_eq!(
        code,
        Some(0),
        "flick did not exit cleanly: {console}\n{log}"
    );
    if !on_pvm() {
        assert!(console.contains("READY uptime="), "{console}");
    }
}

#[test]
fn emulation_failure_is_reported_with_rip_and_instruction_bytes() {
    if !kvm_available() || !on_pvm() {
        eprintln!("skipping: only a PVM host's emulator refuses the guest's XSAVE instructions");
        return;
    }
    let Some(kernel) = artifact("FLICK_KERNEL_VMLINUX") else {
        return;
    };
    // The host profile does not hide XSAVE, which the emulator cannot run.
    let config = serde_json::json!({
        "boot-source": {"kernel_image_path": kernel, "boot_args": "console=ttyS0 panic=1"},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 128, "cpu_profile": "host"}
    });
    let (code, console, log, _) = run_linux(&config);
    assert_eq!(code, Some(3), "{console}\n{log}");
    let line = log
        .lines()
        .find(|l| l.contains("emulation failure"))
        .unwrap_or_default();
    assert!(line.contains("RIP 0xffffffff"), "{log}");
    assert!(line.contains("instruction bytes: "), "{log}");
}

#[test]
fn linux_gets_a_dhcp_lease_over_virtio_net_and_sends_netconsole() {
    if !kvm_available() || !netns_available() {
        return;
    }
    let Some((kernel, dir, image)) = kernel_and_root_copy("linuxnet") else {
        return;
    };
    let mut ns = NetNs::new("lnx", 7);
    ns.start_dhcp(&dir.path("dnsmasq.log"));
    let console_rx = ns.udp_socket(6666);
    console_rx
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    let boot_args = format!(
        "console=ttyS0 reboot=k panic=1 flick.init=reboot ip=dhcp \
         netconsole=6665@{}/eth0,6666@{}/",
        ns.guest_ip, ns.host_ip
    );
    let config = serde_json::json!({
        "boot-source": {"kernel_image_path": kernel, "boot_args": boot_args},
        "drives": [{"drive_id": "rootfs", "path_on_host": image, "is_root_device": true,
                    "is_read_only": false}],
        "network-interfaces": [{"iface_id": "eth0", "host_dev_name": ns.tap,
                                "guest_mac": "06:00:0a:00:07:02"}],
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 256}
    });
    let path = dir.write("vm.json", config.to_string().as_bytes());
    let flick = format!(
        "{} --no-api --level Info --config-file {}",
        flick_bin(),
        path.display()
    );
    let mut child = ns
        .command(&["sh", "-c", &format!("exec {flick}")])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(dir.path("console")).unwrap())
        .stderr(std::fs::File::create(dir.path("log")).unwrap())
        .spawn()
        .unwrap();
    // Collect netconsole datagrams while the guest runs.
    let mut netconsole = Vec::new();
    let start = Instant::now();
    let code = loop {
        let mut buf = [0u8; 2048];
        if let Ok((n, _)) = console_rx.recv_from(&mut buf) {
            netconsole.extend_from_slice(&buf[..n]);
        }
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if start.elapsed() > LINUX_TIMEOUT {
            let _ = child.kill();
            panic!("Linux did not finish in time");
        }
    };
    let console = std::fs::read_to_string(dir.path("console")).unwrap_or_default();
    let netconsole = String::from_utf8_lossy(&netconsole);
    let expected = format!(
        "IP-Config: Got DHCP answer from {}, my address is {}",
        ns.host_ip, ns.guest_ip
    );
    assert!(console.contains(&expected), "{console}");
    assert_eq!(code, Some(0), "{console}");
    assert!(
        netconsole.contains("Run /sbin/init as init process"),
        "netconsole got: {netconsole}"
    );
}
