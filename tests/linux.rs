//! Linux guests: the project's kernel and busybox root file system (built and cached by
//! `scripts/guest-artifacts.sh`, which `scripts/test.sh` runs first and whose paths arrive in
//! `FLICK_KERNEL_*`/`FLICK_ROOTFS_EXT4`/`FLICK_INITRAMFS`).
//!
//! Every boot goes on to user space: init prints `READY`, writes the boot-timer byte (flick logs
//! `Guest-boot-time`) and `flick.init=reboot` ends flick with 0. On a PVM host that relies on the
//! guest kernel's syscall-on-fault patch (resources/guest/linux/patches/0003-*) and on flick
//! hiding the KVM PV features that make hypercalls (SMP guests).

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::*;

/// A hang guard, not a performance bound: a PVM host emulates the guest's kernel code, and on a
/// loaded machine one boot to READY has been seen to take over 5 minutes.
const LINUX_TIMEOUT: Duration = Duration::from_secs(900);

/// One Linux VM at a time. Under PVM every guest runs its kernel code in KVM's emulator, which
/// yields the CPU often; seen here: two Linux guests booting side by side (on 2 host cores,
/// with other work running) both sat in `inet_init` for over five minutes, while one alone got
/// through it in seconds.
static ONE_LINUX_VM: Mutex<()> = Mutex::new(());

fn one_linux_vm() -> MutexGuard<'static, ()> {
    ONE_LINUX_VM
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

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

/// How a Linux VM ended: exit code, serial console, flick's log.
struct LinuxRun {
    code: Option<i32>,
    console: String,
    log: String,
}

impl LinuxRun {
    /// init reached user space, wrote the boot timer and `reboot -f` ended flick with 0.
    fn assert_user_space_and_clean_reboot(&self) {
        let Self { code, console, log } = self;
        assert!(
            console.contains("READY uptime="),
            "no READY from init: {console}\n{log}"
        );
        assert!(
            log.contains("Guest-boot-time"),
            "no boot-timer write: {console}\n{log}"
        );
        assert_eq!(
            *code,
            Some(0),
            "flick did not exit cleanly: {console}\n{log}"
        );
    }

    /// The lines `flick.init=check` prints, without their `CHECK ` prefix.
    fn checks(&self) -> Vec<&str> {
        self.console
            .lines()
            .filter_map(|l| l.trim_end().strip_prefix("CHECK "))
            .collect()
    }

    fn assert_checks_pass(&self, cpus: u8) {
        let cpus = format!("cpus: {cpus}");
        let expected = [
            "exec: hi",
            "pipe: 3",
            "trap: 7",
            "kill: 143",
            "file: data",
            &cpus,
            "done",
        ];
        assert_eq!(self.checks(), expected, "{}\n{}", self.console, self.log);
    }
}

/// Runs a Linux VM to its end (or the timeout).
fn run_linux(config: &serde_json::Value) -> LinuxRun {
    run_linux_serving(config, None)
}

/// Runs a Linux VM to its end (or the timeout); with `command`, the guest's init runs
/// `flick.init=serve` and is sent the command line over the serial console once it asks.
fn run_linux_serving(config: &serde_json::Value, command: Option<&str>) -> LinuxRun {
    let dir = TempDir::new("linux");
    let path = dir.write("vm.json", config.to_string().as_bytes());
    let _one = one_linux_vm();
    let start = Instant::now();
    let mut child = Command::new(flick_bin())
        .args(["--no-api", "--boot-timer", "--config-file"])
        .arg(&path)
        .stdin(if command.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(std::fs::File::create(dir.path("console")).unwrap())
        .stderr(std::fs::File::create(dir.path("log")).unwrap())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take();
    // Kept open after the command is sent, until flick exits.
    let mut _sent = None;
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if start.elapsed() > LINUX_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        if let (Some(input), Some(command)) = (stdin.as_mut(), command) {
            let console = std::fs::read_to_string(dir.path("console")).unwrap_or_default();
            if console.contains("WAITING") {
                use std::io::Write as _;
                input.write_all(format!("{command}\n").as_bytes()).unwrap();
                _sent = stdin.take();
                continue;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let run = LinuxRun {
        code,
        console: std::fs::read_to_string(dir.path("console")).unwrap_or_default(),
        log: std::fs::read_to_string(dir.path("log")).unwrap_or_default(),
    };
    let ready = run.console.lines().find(|l| l.starts_with("READY"));
    let boot_timer = run
        .log
        .lines()
        .find_map(|l| l.split_once("Guest-boot-time"));
    eprintln!(
        "Linux run took {:?}; {}; boot timer{}",
        start.elapsed(),
        ready.unwrap_or("no READY"),
        boot_timer.map_or(": none", |(_, t)| t)
    );
    run
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

/// Boots vmlinux with the ext4 root on virtio-blk; checks the mount went through to the disk.
fn boot_ext4_root(vcpus: u8, init: &str) -> Option<LinuxRun> {
    let (kernel, _dir, image) = kernel_and_root_copy("linuxroot")?;
    let mounts_before = ext4_mount_count(&image);
    let config = serde_json::json!({
        "boot-source": {"kernel_image_path": kernel,
                        "boot_args": format!("console=ttyS0 reboot=k panic=1 flick.init={init}")},
        "drives": [{"drive_id": "rootfs", "path_on_host": image, "is_root_device": true,
                    "is_read_only": false}],
        "machine-config": {"vcpu_count": vcpus, "mem_size_mib": 256}
    });
    let run = run_linux(&config);
    let (console, log) = (&run.console, &run.log);
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
    assert!(
        ext4_mount_count(&image) > mounts_before,
        "ext4 mount count did not go up"
    );
    Some(run)
}

/// Boots the bzImage with the uncompressed initramfs as root.
fn boot_initramfs(vcpus: u8, init: &str) -> Option<LinuxRun> {
    let (Some(kernel), Some(initrd)) = (
        artifact("FLICK_KERNEL_BZIMAGE"),
        artifact("FLICK_INITRAMFS"),
    ) else {
        return None;
    };
    let config = serde_json::json!({
        "boot-source": {"kernel_image_path": kernel, "initrd_path": initrd,
                        "boot_args": format!("console=ttyS0 reboot=k panic=1 flick.init={init}")},
        "machine-config": {"vcpu_count": vcpus, "mem_size_mib": 256}
    });
    let run = run_linux(&config);
    assert!(
        run.console.contains("Run /init as init process"),
        "{}\n{}",
        run.console,
        run.log
    );
    Some(run)
}

#[test]
fn linux_on_ext4_root_from_virtio_blk_reaches_user_space_and_reboots() {
    if !kvm_available() {
        return;
    }
    if let Some(run) = boot_ext4_root(1, "reboot") {
        run.assert_user_space_and_clean_reboot();
    }
}

/// 2-vCPU Linux user space on a PVM host: a program intermittently segfaults reading its TLS
/// (FS base 0 on the second CPU; seen in 1 of 4 such boots), and the guest then halts instead of
/// rebooting. Until that is fixed these boots run only where asked for on PVM hosts (they always
/// run on hardware virtualization, e.g. the nested lane); the skip is reported as a known issue.
fn smp_user_space_known_issue() -> bool {
    if !on_pvm() || std::env::var_os("FLICK_LINUX_SMP_ON_PVM").is_some() {
        return false;
    }
    known_issue(
        "2-vCPU Linux user space on a PVM host segfaults intermittently (TLS read with FS base 0 \
         on CPU 1); not run here (FLICK_LINUX_SMP_ON_PVM=1 runs it); it runs on the nested lane",
    );
    true
}

#[test]
fn linux_smp_on_ext4_root_runs_programs_in_user_space() {
    if !kvm_available() || smp_user_space_known_issue() {
        return;
    }
    if let Some(run) = boot_ext4_root(2, "check") {
        run.assert_user_space_and_clean_reboot();
        run.assert_checks_pass(2);
    }
}

#[test]
fn linux_bzimage_with_initramfs_runs_programs_in_user_space() {
    if !kvm_available() {
        return;
    }
    if let Some(run) = boot_initramfs(1, "check") {
        run.assert_user_space_and_clean_reboot();
        run.assert_checks_pass(1);
    }
}

#[test]
fn linux_smp_bzimage_with_initramfs_reaches_user_space_and_reboots() {
    if !kvm_available() || smp_user_space_known_issue() {
        return;
    }
    if let Some(run) = boot_initramfs(2, "reboot") {
        run.assert_user_space_and_clean_reboot();
        assert!(
            run.console.contains("smp: Brought up 1 node, 2 CPUs"),
            "{}",
            run.console
        );
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
    let LinuxRun { code, log, .. } = run_linux(&config);
    assert_eq!(code, Some(3), "{log}");
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
    let _one = one_linux_vm();
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
    assert!(console.contains("READY uptime="), "{console}");
    assert_eq!(code, Some(0), "{console}");
    assert!(
        netconsole.contains("Run /sbin/init as init process"),
        "netconsole got: {netconsole}"
    );
}

#[test]
fn linux_hwrng_reads_from_the_entropy_device() {
    if !kvm_available() {
        return;
    }
    let Some((kernel, _dir, image)) = kernel_and_root_copy("linuxrng") else {
        return;
    };
    let config = serde_json::json!({
        "boot-source": {"kernel_image_path": kernel,
                        "boot_args": "console=ttyS0 reboot=k panic=1 flick.init=serve"},
        "drives": [{"drive_id": "rootfs", "path_on_host": image, "is_root_device": true,
                    "is_read_only": false}],
        "entropy": {},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 256}
    });
    let run = run_linux_serving(
        &config,
        Some(
            "echo RNG current: $(cat /sys/class/misc/hw_random/rng_current); \
             echo RNG read: $(head -c 4096 /dev/hwrng | wc -c) bytes",
        ),
    );
    run.assert_user_space_and_clean_reboot();
    assert!(
        run.console.contains("RNG current: virtio_rng.0"),
        "{}\n{}",
        run.console,
        run.log
    );
    assert!(
        run.console.contains("RNG read: 4096 bytes"),
        "{}\n{}",
        run.console,
        run.log
    );
}

/// Waits until `file` contains `needle` or `child` exits or the Linux timeout passes.
fn wait_for_console(file: &std::path::Path, needle: &str, child: &mut std::process::Child) -> bool {
    let start = Instant::now();
    while start.elapsed() < LINUX_TIMEOUT {
        if std::fs::read_to_string(file).is_ok_and(|t| t.contains(needle)) {
            return true;
        }
        if child.try_wait().unwrap().is_some() {
            return std::fs::read_to_string(file).is_ok_and(|t| t.contains(needle));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

#[test]
fn linux_snapshot_restores_and_user_space_answers() {
    if !kvm_available() {
        return;
    }
    let Some((kernel, dir, image)) = kernel_and_root_copy("linuxsnap") else {
        return;
    };
    let _one = one_linux_vm();
    // Boot to init's prompt, pause, snapshot.
    let source = ApiFlick::start("linuxsnap-source");
    source.put_all(&[
        (
            "/boot-source",
            serde_json::json!({"kernel_image_path": kernel,
                "boot_args": "console=ttyS0 reboot=k panic=1 flick.init=serve"}),
        ),
        (
            "/drives/rootfs",
            serde_json::json!({"drive_id": "rootfs", "path_on_host": image,
                "is_root_device": true, "is_read_only": false}),
        ),
        (
            "/machine-config",
            serde_json::json!({"vcpu_count": 1, "mem_size_mib": 256}),
        ),
        (
            "/actions",
            serde_json::json!({"action_type": "InstanceStart"}),
        ),
    ]);
    let mut source = source;
    let stdout = source.stdout.clone();
    assert!(
        wait_for_console(&stdout, "WAITING", &mut source.child),
        "no prompt: {}",
        std::fs::read_to_string(&stdout).unwrap_or_default()
    );
    let (status, body) = source.call("PATCH", "/vm", Some(r#"{"state": "Paused"}"#));
    assert_eq!(status, 204, "{body}");
    let state = dir.path("linux.state");
    let mem = dir.path("linux.mem");
    let create = serde_json::json!({"snapshot_path": state, "mem_file_path": mem});
    let (status, body) = source.call("PUT", "/snapshot/create", Some(&create.to_string()));
    assert_eq!(status, 204, "{body}");
    drop(source);

    // Restore in a new flick, resume, and answer the prompt through its console.
    let sock = dir.path("restored.sock");
    let console = dir.path("restored.console");
    let mut restored = Command::new(flick_bin())
        .arg("--api-sock")
        .arg(&sock)
        .stdin(Stdio::piped())
        .stdout(std::fs::File::create(&console).unwrap())
        .stderr(std::fs::File::create(dir.path("restored.log")).unwrap())
        .spawn()
        .unwrap();
    wait_for_socket(&sock);
    let load = serde_json::json!({"snapshot_path": state,
        "mem_backend": {"backend_type": "File", "backend_path": mem}, "resume_vm": true});
    let (status, body) = api_call(&sock, "PUT", "/snapshot/load", Some(&load.to_string()));
    assert_eq!(status, 204, "{body}");
    {
        use std::io::Write as _;
        let stdin = restored.stdin.as_mut().unwrap();
        stdin.write_all(b"echo restored-$((6*7))\n").unwrap();
    }
    let answered = wait_for_console(&console, "restored-42", &mut restored);
    let code = wait_with_timeout(&mut restored, LINUX_TIMEOUT);
    let text = std::fs::read_to_string(&console).unwrap_or_default();
    let log = std::fs::read_to_string(dir.path("restored.log")).unwrap_or_default();
    assert!(
        answered,
        "the restored guest did not run the command: {text}\n{log}"
    );
    assert_eq!(
        code,
        Some(0),
        "the restored guest did not reboot cleanly: {text}\n{log}"
    );
}
