//! flick confined by a jailer: flick's own `flick-jailer`, and Firecracker's jailer where
//! `FLICK_FC_JAILER` names one. Each test boots the test guest through the API socket inside
//! the jail, as an unprivileged uid/gid, and checks from the host that flick runs in the
//! chroot, the cgroup, the network namespace and with the limits it was given. Tests remove
//! their jails, cgroups and namespaces.

mod common;

use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// The unprivileged user and group flick runs as in the jail (`nobody`/`nogroup`).
const UID: u32 = 65534;
const GID: u32 = 65534;

fn jailer_bin() -> &'static str {
    env!("CARGO_BIN_EXE_flick-jailer")
}

/// A cgroup hierarchy to test with: its mount point, `--cgroup-version`, and a setting.
#[derive(Debug, Clone)]
struct Hierarchy {
    mount: PathBuf,
    version: u8,
    setting: &'static str,
}

/// Cgroup mounts from `/proc/self/mountinfo`: (mount point, fstype, super options).
fn cgroup_mounts() -> Vec<(PathBuf, String, String)> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mount = left.split(' ').nth(4)?;
            let mut right = right.split(' ');
            let fstype = right.next()?;
            let options = right.nth(1)?;
            fstype
                .starts_with("cgroup")
                .then(|| (PathBuf::from(mount), fstype.into(), options.into()))
        })
        .collect()
}

/// The v1 `pids` hierarchy, limited with `pids.max`.
fn v1_pids() -> Option<Hierarchy> {
    cgroup_mounts()
        .into_iter()
        .find(|(_, fstype, options)| fstype == "cgroup" && options.split(',').any(|o| o == "pids"))
        .map(|(mount, _, _)| Hierarchy {
            mount,
            version: 1,
            setting: "pids.max=64",
        })
}

/// The v2 hierarchy with a controller to set: `pids.max`, or else `hugetlb.2MB.max` (a
/// hybrid host may delegate only hugetlb to v2).
fn v2_any() -> Option<Hierarchy> {
    let (mount, _, _) = cgroup_mounts()
        .into_iter()
        .find(|(_, fstype, _)| fstype == "cgroup2")?;
    let controllers = std::fs::read_to_string(mount.join("cgroup.controllers")).ok()?;
    let has = |c: &str| controllers.split_whitespace().any(|x| x == c);
    let setting = if has("pids") {
        "pids.max=64"
    } else if has("hugetlb") {
        "hugetlb.2MB.max=0"
    } else {
        return None;
    };
    Some(Hierarchy {
        mount,
        version: 2,
        setting,
    })
}

/// A jail directory tree under a private base directory, made ready for flick (its shared
/// libraries and the guest's files); removes the jail's cgroups on drop.
struct Jail {
    base: TempDir,
    id: String,
    root: PathBuf,
    /// `--parent-cgroup`: private to this test.
    parent_cgroup: String,
    hierarchy: Hierarchy,
    /// The v2 root's `cgroup.subtree_control` before the test (restored on drop).
    v2_root_control: Option<String>,
    /// Held while a v2 jail exists: tests that change the v2 root's controllers take turns,
    /// so each restores what it found.
    _v2_turn: Option<std::sync::MutexGuard<'static, ()>>,
    /// The jailed process, killed on drop if it still runs in the jail.
    pid: std::cell::Cell<Option<u32>>,
}

impl Jail {
    fn new(tag: &str, hierarchy: Hierarchy) -> Jail {
        let base = TempDir::new(tag);
        let id = format!("{tag}-{}", std::process::id());
        let root = base.0.join("flick").join(&id).join("root");
        std::fs::create_dir_all(&root).unwrap();
        stage_libraries(&root);
        static V2_TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let v2_turn = (hierarchy.version == 2).then(|| {
            V2_TURN
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
        });
        let v2_root_control = (hierarchy.version == 2).then(|| {
            std::fs::read_to_string(hierarchy.mount.join("cgroup.subtree_control")).unwrap()
        });
        Jail {
            base,
            parent_cgroup: format!("flick-test-{id}"),
            id,
            root,
            hierarchy,
            v2_root_control,
            _v2_turn: v2_turn,
            pid: std::cell::Cell::new(None),
        }
    }

    /// Copies `src` into the jail's root as `name`, owned by the jailed user; returns its path
    /// as flick sees it.
    fn stage(&self, src: &Path, name: &str) -> String {
        let dst = self.root.join(name);
        std::fs::copy(src, &dst).unwrap();
        std::os::unix::fs::chown(&dst, Some(UID), Some(GID)).unwrap();
        format!("/{name}")
    }

    /// The host path of a path inside the jail.
    fn host_path(&self, inside: &str) -> PathBuf {
        self.root.join(inside.trim_start_matches('/'))
    }

    fn cgroup_dir(&self) -> PathBuf {
        self.hierarchy
            .mount
            .join(&self.parent_cgroup)
            .join(&self.id)
    }

    /// The jailer's arguments common to every test, up to and including `--`.
    fn args(&self, ns: &NetNs, exec_file: &str) -> Vec<String> {
        [
            "--id",
            &self.id,
            "--exec-file",
            exec_file,
            "--uid",
            &UID.to_string(),
            "--gid",
            &GID.to_string(),
            "--chroot-base-dir",
            self.base.0.to_str().unwrap(),
            "--netns",
            &format!("/var/run/netns/{}", ns.name),
            "--cgroup-version",
            &self.hierarchy.version.to_string(),
            "--cgroup",
            self.hierarchy.setting,
            "--parent-cgroup",
            &self.parent_cgroup,
            "--resource-limit",
            "no-file=512",
            "--resource-limit",
            "fsize=268435456",
            "--",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    /// The pid the jailer wrote in `<root>/flick.pid`, once it is there.
    fn wait_for_pid(&self) -> u32 {
        let path = self.root.join("flick.pid");
        let start = Instant::now();
        loop {
            if let Some(pid) = std::fs::read_to_string(&path)
                .ok()
                .and_then(|s| s.trim().parse().ok())
            {
                self.pid.set(Some(pid));
                return pid;
            }
            assert!(start.elapsed() < VM_TIMEOUT, "no pid in {}", path.display());
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Jail {
    fn drop(&mut self) {
        if let Some(pid) = self.pid.get() {
            let root = PathBuf::from(format!("/proc/{pid}/root"));
            // Only a process still inside this jail (the pid may have been reused).
            if root.exists() && same_file(&root, &self.root) {
                // SAFETY: kill sends a signal; the pid is checked to be our jailed process.
                unsafe { libc::kill(libc::pid_t::try_from(pid).unwrap(), libc::SIGKILL) };
                let start = Instant::now();
                while root.exists() && start.elapsed() < Duration::from_secs(5) {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
        // The VMM's teardown child may still be leaving the cgroup: retry for a while.
        for dir in [
            self.cgroup_dir(),
            self.hierarchy.mount.join(&self.parent_cgroup),
        ] {
            let start = Instant::now();
            while dir.exists()
                && std::fs::remove_dir(&dir).is_err()
                && start.elapsed() < Duration::from_secs(5)
            {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if let Some(before) = &self.v2_root_control {
            let control = self.hierarchy.mount.join("cgroup.subtree_control");
            let now = std::fs::read_to_string(&control).unwrap_or_default();
            for controller in now.split_whitespace() {
                if !before.split_whitespace().any(|c| c == controller) {
                    let _ = std::fs::write(&control, format!("-{controller}"));
                }
            }
        }
    }
}

/// Copies the shared libraries flick loads (as `ldd` lists them) into the jail, at the same
/// paths: a jail holds nothing but what is put there.
fn stage_libraries(root: &Path) {
    let out = Command::new("ldd")
        .arg(flick_bin())
        .output()
        .expect("run ldd");
    let text = String::from_utf8_lossy(&out.stdout);
    for line in text.lines() {
        let Some(lib) = line
            .split_whitespace()
            .find(|word| word.starts_with('/'))
            .map(Path::new)
        else {
            continue;
        };
        let dst = root.join(lib.strip_prefix("/").unwrap());
        std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
        std::fs::copy(lib, &dst).unwrap_or_else(|e| panic!("copy {}: {e}", lib.display()));
    }
}

/// The guest's command line: check the disk, then ping the host through the TAP.
fn guest_args(ns: &NetNs) -> String {
    format!(
        "tg.smp=0 tg.quiet=1 tg.blk=check tg.blk_seed=5 tg.blk_count=8 tg.net=ping \
         tg.ip={} tg.peer={}",
        ns.guest_ip, ns.host_ip
    )
}

/// The lines a guest booted with [`guest_args`] prints when disk and network work.
const GUEST_LINES: [&str; 4] = [
    "blk0: write ok sectors=0-7",
    "blk0: readback ok",
    "net0: ping done ok=3/3",
    "testguest: done",
];

/// Configures the VM through the jailed flick's API socket (paths inside the jail) and starts
/// it. `serial_out` (a path inside the jail) takes the serial console instead of stdout.
fn configure_and_start(jail: &Jail, ns: &NetNs, serial_out: Option<&str>) {
    let sock = jail.host_path("/run/api.sock");
    wait_for_socket(&sock);
    let kernel = jail.stage(&test_guest(), "kernel.elf");
    let disk_file = jail.base.write("disk.img", &vec![0u8; 64 * 512]);
    let disk = jail.stage(&disk_file, "disk.img");
    let mut calls = vec![
        (
            "/boot-source",
            serde_json::json!({"kernel_image_path": kernel, "boot_args": guest_args(ns)}),
        ),
        (
            "/machine-config",
            serde_json::json!({"vcpu_count": 1, "mem_size_mib": 64}),
        ),
        (
            "/drives/data",
            serde_json::json!({"drive_id": "data", "path_on_host": disk,
                               "is_root_device": false, "is_read_only": false}),
        ),
        (
            "/network-interfaces/eth0",
            serde_json::json!({"iface_id": "eth0", "host_dev_name": ns.tap,
                               "guest_mac": "06:00:0a:00:2a:02"}),
        ),
    ];
    if let Some(path) = serial_out {
        calls.push(("/serial", serde_json::json!({ "serial_out_path": path })));
    }
    calls.push((
        "/actions",
        serde_json::json!({"action_type": "InstanceStart"}),
    ));
    for (path, body) in calls {
        let (status, answer) = api_call(&sock, "PUT", path, Some(&body.to_string()));
        assert_eq!(status, 204, "PUT {path}: {answer}");
    }
}

/// A field of `/proc/<pid>/status` (`Uid`, `Gid`, `NSpid`, ...).
fn status_field(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// Whether two paths are the same file (inode and device).
fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

/// Checks from the host that process `pid` runs confined as the jail says.
fn assert_confined(jail: &Jail, ns: &NetNs, pid: u32) {
    let ugid = |id: u32| format!("{id} {id} {id} {id}");
    assert_eq!(status_field(pid, "Uid"), ugid(UID));
    assert_eq!(status_field(pid, "Gid"), ugid(GID));
    assert_eq!(status_field(pid, "Groups"), "");
    for caps in ["CapPrm", "CapEff"] {
        assert_eq!(status_field(pid, caps), "0000000000000000", "{caps}");
    }
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    assert!(
        same_file(&proc_dir.join("root"), &jail.root),
        "flick's root is not the jail {}",
        jail.root.display()
    );
    assert!(
        same_file(
            &proc_dir.join("ns/net"),
            Path::new(&format!("/var/run/netns/{}", ns.name))
        ),
        "flick is not in network namespace {}",
        ns.name
    );
    let cgroups = std::fs::read_to_string(proc_dir.join("cgroup")).unwrap();
    let expected = format!("/{}/{}", jail.parent_cgroup, jail.id);
    assert!(
        cgroups
            .lines()
            .any(|l| l.ends_with(&format!(":{expected}"))),
        "flick is not in cgroup {expected}: {cgroups}"
    );
    let (file, value) = jail.hierarchy.setting.split_once('=').unwrap();
    let written = std::fs::read_to_string(jail.cgroup_dir().join(file)).unwrap();
    assert_eq!(written.trim(), value);
    let limits = std::fs::read_to_string(proc_dir.join("limits")).unwrap();
    let open_files = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    assert_eq!(
        open_files.split_whitespace().collect::<Vec<_>>()[3..5],
        ["512", "512"],
        "{open_files}"
    );
    let fsize = limits
        .lines()
        .find(|l| l.starts_with("Max file size"))
        .unwrap();
    assert!(fsize.contains("268435456"), "{fsize}");
    // The fd the test left open for the jailer did not reach flick.
    let marker = jail.base.path(LEAK_MARKER);
    for entry in std::fs::read_dir(proc_dir.join("fd")).unwrap() {
        let target = std::fs::read_link(entry.unwrap().path()).unwrap();
        assert_ne!(target, marker, "an inherited fd leaked into the jail");
    }
}

/// A file the jailer inherits as fd [`LEAK_FD`] (not close-on-exec).
const LEAK_MARKER: &str = "inherited-fd";
const LEAK_FD: i32 = 9;

/// Attaches to TAP `name` in the namespace from this (root) process, as another VMM would:
/// the returned file keeps it busy.
fn hold_tap(ns: &NetNs, name: &str) -> std::fs::File {
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    const FLAGS: libc::c_short = 0x0002 | 0x1000 | 0x4000; // IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
    let path = format!("/var/run/netns/{}", ns.name);
    let name = name.to_string();
    std::thread::spawn(move || {
        let netns = std::fs::File::open(path).unwrap();
        // SAFETY: setns on this short-lived thread only; the fd is valid.
        let rc = unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        let tun = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .unwrap();
        let mut req = [0u8; 40];
        req[..name.len()].copy_from_slice(name.as_bytes());
        req[16..18].copy_from_slice(&FLAGS.to_ne_bytes());
        // SAFETY: TUNSETIFF reads and writes a 40-byte ifreq we own.
        let rc = unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, req.as_mut_ptr()) };
        assert_eq!(
            rc,
            0,
            "TUNSETIFF {name}: {}",
            std::io::Error::last_os_error()
        );
        tun
    })
    .join()
    .unwrap()
}

/// A jailed flick refuses a TAP that does not exist and one another process holds, with
/// clear messages (it finds TAPs through /dev/net/tun, without /sys).
fn assert_tap_errors(jail: &Jail, ns: &NetNs) {
    let sock = jail.host_path("/run/api.sock");
    let put = |tap: &str| {
        let body = serde_json::json!({"iface_id": "probe", "host_dev_name": tap});
        api_call(
            &sock,
            "PUT",
            "/network-interfaces/probe",
            Some(&body.to_string()),
        )
    };
    let (status, body) = put("nosuchtap0");
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains("TAP device nosuchtap0 does not exist or this user may not attach to it"),
        "{body}"
    );
    let uid = UID.to_string();
    ns.exec_ok(&["ip", "tuntap", "add", "busy0", "mode", "tap", "user", &uid]);
    let _holder = hold_tap(ns, "busy0");
    let (status, body) = put("busy0");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("TAP device busy0 is busy"), "{body}");
}

/// Starts `jailer` with `args`; stdout and stderr go to files in the jail's base directory.
fn spawn_jailer(jailer: &str, jail: &Jail, args: &[String]) -> (Child, PathBuf, PathBuf) {
    let out = jail.base.path("stdout");
    let err = jail.base.path("stderr");
    let marker = std::fs::File::create(jail.base.path(LEAK_MARKER)).unwrap();
    let mut cmd = Command::new(jailer);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap());
    let fd = marker.as_raw_fd();
    // SAFETY: the closure only calls dup2 (async-signal-safe) in the forked child; dup2 leaves
    // the copy without close-on-exec, so the jailer inherits it.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(fd, LEAK_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().unwrap();
    (child, out, err)
}

/// Boots the guest under `jailer` (flick-jailer or Firecracker's, same command line) without
/// new namespaces for the PID or the session: flick is the jailer's own process.
fn boot_under(jailer: &str, tag: &str, subnet: u8) {
    let Some(hierarchy) = v1_pids().or_else(v2_any) else {
        skip("no cgroup hierarchy with the pids or hugetlb controller is mounted");
        return;
    };
    let ns = NetNs::with_tap_user(tag, subnet, Some(UID));
    let jail = Jail::new(tag, hierarchy);
    let mut args = jail.args(&ns, flick_bin());
    args.extend(["--api-sock", "/run/api.sock", "--level", "Info"].map(String::from));
    let (mut child, out, err) = spawn_jailer(jailer, &jail, &args);

    wait_for_socket(&jail.host_path("/run/api.sock"));
    let pid = jail.wait_for_pid();
    assert_eq!(pid, child.id(), "flick should be the jailer's own process");
    assert_confined(&jail, &ns, pid);
    assert_tap_errors(&jail, &ns);
    configure_and_start(&jail, &ns, None);
    let code = wait_with_timeout(&mut child, VM_TIMEOUT);

    let stdout = std::fs::read_to_string(out).unwrap().replace("\r\n", "\n");
    let stderr = std::fs::read_to_string(err).unwrap();
    assert_eq!(code, Some(0), "stdout:\n{stdout}\nstderr:\n{stderr}");
    for line in GUEST_LINES {
        assert!(
            stdout.lines().any(|l| l == line),
            "missing {line:?}:\n{stdout}\nstderr:\n{stderr}"
        );
    }
    assert!(
        stderr.contains("process startup time: "),
        "the jailer's start time was not used: {stderr}"
    );
}

#[test]
fn flick_jailer_boots_a_guest_with_disk_and_tap_as_an_unprivileged_user() {
    if !kvm_available() || !netns_available() {
        return;
    }
    boot_under(jailer_bin(), "jail", 41);
}

#[test]
fn firecrackers_jailer_runs_flick_unchanged() {
    let Some(jailer) = std::env::var_os("FLICK_FC_JAILER") else {
        not_run_without("FLICK_FC_JAILER, a build of Firecracker's jailer (docs/jailer.md)");
        return;
    };
    if !kvm_available() || !netns_available() {
        return;
    }
    boot_under(jailer.to_str().unwrap(), "fcjail", 42);
}

#[test]
fn flick_jailer_daemonizes_into_a_new_pid_namespace_with_cgroup_v2() {
    if !kvm_available() || !netns_available() {
        return;
    }
    boot_detached_under(jailer_bin(), "jailpid", 43);
}

#[test]
fn firecrackers_jailer_daemonizes_flick_into_a_new_pid_namespace() {
    let Some(jailer) = std::env::var_os("FLICK_FC_JAILER") else {
        not_run_without("FLICK_FC_JAILER, a build of Firecracker's jailer (docs/jailer.md)");
        return;
    };
    if !kvm_available() || !netns_available() {
        return;
    }
    boot_detached_under(jailer.to_str().unwrap(), "fcjailpid", 44);
}

/// Boots the guest under `jailer` with `--daemonize --new-pid-ns` and cgroup v2: flick runs
/// detached as PID 1 of its own PID namespace; its serial output goes to a file in the jail.
fn boot_detached_under(jailer: &str, tag: &str, subnet: u8) {
    let Some(hierarchy) = v2_any() else {
        skip("no cgroup v2 hierarchy with the pids or hugetlb controller is mounted");
        return;
    };
    let ns = NetNs::with_tap_user(tag, subnet, Some(UID));
    let jail = Jail::new(tag, hierarchy);
    let mut args = jail.args(&ns, flick_bin());
    args.splice(0..0, ["--daemonize", "--new-pid-ns"].map(String::from));
    args.extend(["--api-sock", "/run/api.sock"].map(String::from));
    let (mut child, _, err) = spawn_jailer(jailer, &jail, &args);
    // The jailer's first process returns at once; flick runs on, detached.
    assert_eq!(wait_with_timeout(&mut child, VM_TIMEOUT), Some(0));

    let pid = jail.wait_for_pid();
    wait_for_socket(&jail.host_path("/run/api.sock"));
    assert_eq!(status_field(pid, "NSpid"), format!("{pid} 1"));
    // SAFETY: getsid only reads a process's session id.
    let (session, ours) = unsafe {
        (
            libc::getsid(libc::pid_t::try_from(pid).unwrap()),
            libc::getsid(0),
        )
    };
    assert!(
        session > 0 && session != ours,
        "flick is still in the test's session"
    );
    let stdin = std::fs::read_link(format!("/proc/{pid}/fd/0")).unwrap();
    assert_eq!(stdin, Path::new("/dev/null"));
    assert_confined(&jail, &ns, pid);
    configure_and_start(&jail, &ns, Some("/run/serial.out"));

    let serial = jail.host_path("/run/serial.out");
    wait_for_text(&serial, "testguest: done");
    let start = Instant::now();
    while Path::new(&format!("/proc/{pid}")).exists() {
        assert!(start.elapsed() < VM_TIMEOUT, "flick did not exit");
        std::thread::sleep(Duration::from_millis(5));
    }
    let text = std::fs::read_to_string(serial)
        .unwrap()
        .replace("\r\n", "\n");
    for line in GUEST_LINES {
        assert!(text.lines().any(|l| l == line), "missing {line:?}:\n{text}");
    }
    assert_eq!(std::fs::read_to_string(err).unwrap(), "");
}

/// Runs flick-jailer with `args` and returns (exit code, stderr).
fn jailer_error(args: &[String]) -> (Option<i32>, String) {
    let out = Command::new(jailer_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn strings(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// Asserts one `flick-jailer: error:` line containing `needle` and exit code `code`.
fn assert_jailer_error(args: &[String], code: i32, needle: &str) {
    let (got, stderr) = jailer_error(args);
    let lines: Vec<_> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{args:?}: {stderr}");
    assert!(
        lines[0].starts_with("flick-jailer: error: ") && lines[0].contains(needle),
        "{args:?}: expected {needle:?} in {stderr:?}"
    );
    assert_eq!(got, Some(code), "{args:?}: {stderr}");
}

#[test]
fn bad_jailer_arguments_give_one_error_line_and_a_distinct_code() {
    let base = TempDir::new("jailbad");
    let required = |id: &str, exec: &str| {
        strings(&["--id", id, "--exec-file", exec, "--uid", "1", "--gid", "1"])
    };
    let with_base = |extra: &[&str]| {
        let mut args = required("ok-1", flick_bin());
        args.extend(strings(&["--chroot-base-dir", base.0.to_str().unwrap()]));
        args.extend(strings(extra));
        args
    };
    let parsing = [
        (strings(&["--bogus"]), "unknown argument --bogus"),
        (
            strings(&["--exec-file", flick_bin(), "--uid", "1", "--gid", "1"]),
            "--id is required",
        ),
        (required("a/b", flick_bin()), "invalid instance id"),
        (with_base(&["--cgroup", "nodot=1"]), "invalid --cgroup"),
        (
            with_base(&["--resource-limit", "nproc=1"]),
            "invalid --resource-limit",
        ),
        (
            with_base(&["--cgroup-version", "3"]),
            "invalid --cgroup-version",
        ),
    ];
    for (args, needle) in parsing {
        assert_jailer_error(&args, 2, needle);
    }
    let mut no_base = required("ok-3", flick_bin());
    no_base.extend(strings(&["--chroot-base-dir", "/nonexistent-base"]));
    assert_jailer_error(
        &required("ok-2", "/nonexistent/flick"),
        3,
        "cannot resolve /nonexistent/flick",
    );
    assert_jailer_error(&no_base, 4, "cannot resolve --chroot-base-dir");

    // Later steps need the privileges to make a jail (chown to another user).
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        skip("the jail set-up errors need root");
        return;
    }
    assert_jailer_error(
        &with_base(&["--netns", "/nonexistent/netns"]),
        7,
        "cannot open /nonexistent/netns",
    );
    assert_jailer_error(
        &with_base(&["--cgroup", "nosuchcontroller.max=1"]),
        5,
        "cgroup controller nosuchcontroller is not available",
    );
}
