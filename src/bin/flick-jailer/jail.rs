//! Building the jail and entering it, in Firecracker's jailer's order: copy the exec file into
//! `<base>/<exec name>/<id>/root`, join the network namespace, set resource limits, join the
//! cgroups, enter a new mount namespace and `pivot_root` into the jail, make the device nodes,
//! detach (`--daemonize`), start a new PID namespace (`--new-pid-ns`), drop to uid/gid, exec
//! (the process steps are in `process.rs`).

use std::ffi::{CStr, CString};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::args::{JailConfig, ResourceLimits};
use crate::cgroup::{self, CgroupError};
use crate::process::{self, CpuAccount, StartTimes};
use crate::Failure;

/// A character device the jail gets: path inside the jail, major, minor.
struct Device {
    path: &'static CStr,
    major: u32,
    minor: u32,
}

const KVM: Device = Device {
    path: c"/dev/kvm",
    major: 10,
    minor: 232,
};
const TUN: Device = Device {
    path: c"/dev/net/tun",
    major: 10,
    minor: 200,
};
const URANDOM: Device = Device {
    path: c"/dev/urandom",
    major: 1,
    minor: 9,
};
/// userfaultfd's misc minor is dynamic: read from `/proc/misc`.
const USERFAULTFD: &CStr = c"/dev/userfaultfd";
const MISC_MAJOR: u32 = 10;

/// Directories made in the jail (owned by uid/gid, mode 0700), after the jail's root itself.
const JAIL_DIRS: [&str; 3] = ["/dev", "/dev/net", "/run"];

fn os_error() -> std::io::Error {
    std::io::Error::last_os_error()
}

fn cstring(path: &Path) -> Result<CString, Failure> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| Failure::Args(format!("{} contains a NUL byte", path.display())))
}

/// The jail's root directory: `<base>/<exec file name>/<id>/root`.
pub fn chroot_dir(base: &Path, exec_name: &str, id: &str) -> PathBuf {
    base.join(exec_name).join(id).join("root")
}

/// The exec file (canonical path) and its name.
fn exec_file(path: &Path) -> Result<(PathBuf, String), Failure> {
    let canonical = std::fs::canonicalize(path)
        .map_err(|e| Failure::ExecFile(format!("cannot resolve {}: {e}", path.display())))?;
    if !canonical.is_file() {
        return Err(Failure::ExecFile(format!(
            "{} is not a regular file",
            canonical.display()
        )));
    }
    let name = canonical
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Failure::ExecFile(format!("{} has no usable name", canonical.display())))?
        .to_string();
    Ok((canonical, name))
}

/// Copies the exec file into the jail's root, owned by uid/gid, keeping its mode. Refuses a
/// destination that is a link to some other file.
fn copy_exec(src: &Path, dst: &Path, uid: u32, gid: u32) -> Result<(), Failure> {
    let fail = |what: &str, e: std::io::Error| {
        Failure::Chroot(format!("cannot {what} {}: {e}", dst.display()))
    };
    let mut input = std::fs::File::open(src)
        .map_err(|e| Failure::ExecFile(format!("cannot open {}: {e}", src.display())))?;
    let mode = input
        .metadata()
        .map_err(|e| Failure::ExecFile(format!("cannot stat {}: {e}", src.display())))?
        .mode();
    let mut output = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(mode & 0o7777)
        .custom_flags(libc::O_NOFOLLOW)
        .open(dst)
        .map_err(|e| fail("create", e))?;
    let meta = output.metadata().map_err(|e| fail("stat", e))?;
    if meta.nlink() > 1 {
        return Err(Failure::Chroot(format!(
            "{} is a hard link; refusing to overwrite it",
            dst.display()
        )));
    }
    output.set_len(0).map_err(|e| fail("truncate", e))?;
    std::os::unix::fs::fchown(&output, Some(uid), Some(gid)).map_err(|e| fail("chown", e))?;
    output
        .set_permissions(std::fs::Permissions::from_mode(mode & 0o7777))
        .map_err(|e| fail("chmod", e))?;
    std::io::copy(&mut input, &mut output).map_err(|e| fail("copy the exec file to", e))?;
    Ok(())
}

fn join_netns(path: &Path) -> Result<(), Failure> {
    let ns = std::fs::File::open(path)
        .map_err(|e| Failure::Netns(format!("cannot open {}: {e}", path.display())))?;
    // SAFETY: setns on an fd we own; it only changes this process's network namespace.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(Failure::Netns(format!(
            "cannot join the network namespace {}: {}",
            path.display(),
            os_error()
        )));
    }
    Ok(())
}

fn set_limit(resource: libc::__rlimit_resource_t, name: &str, value: u64) -> Result<(), Failure> {
    let limit = libc::rlimit {
        rlim_cur: value,
        rlim_max: value,
    };
    // SAFETY: setrlimit reads the struct we pass.
    if unsafe { libc::setrlimit(resource, &limit) } != 0 {
        return Err(Failure::Rlimit(format!(
            "cannot set {name} to {value}: {}",
            os_error()
        )));
    }
    Ok(())
}

fn set_limits(limits: &ResourceLimits) -> Result<(), Failure> {
    if let Some(fsize) = limits.fsize {
        set_limit(libc::RLIMIT_FSIZE, "fsize", fsize)?;
    }
    set_limit(libc::RLIMIT_NOFILE, "no-file", limits.no_file)
}

fn join_cgroups(config: &JailConfig, exec_name: &str) -> Result<(), CgroupError> {
    const MOUNTINFO: &str = "/proc/self/mountinfo";
    let text = std::fs::read_to_string(MOUNTINFO).map_err(|e| CgroupError::Mounts(MOUNTINFO, e))?;
    let mounts = cgroup::parse_mountinfo(&text);
    let parent = config
        .parent_cgroup
        .clone()
        .unwrap_or_else(|| PathBuf::from(exec_name));
    if config.cgroups.is_empty() {
        if config.cgroup_version == 2 {
            cgroup::join_v2_parent(&mounts, &parent)?;
        }
        return Ok(());
    }
    let plan = cgroup::plan(
        &mounts,
        config.cgroup_version,
        &parent,
        &config.id,
        &config.cgroups,
    )?;
    plan.apply()
}

/// Checks a libc return value; `what` names the step for the error.
fn check(rc: libc::c_int, what: &str) -> Result<(), Failure> {
    if rc != 0 {
        return Err(Failure::Mount(format!("cannot {what}: {}", os_error())));
    }
    Ok(())
}

/// Enters a new mount namespace whose root is `root`: the host's mounts are gone after this.
fn pivot_into(root: &Path) -> Result<(), Failure> {
    let root_c = cstring(root)?;
    let old = c"old_root";
    // SAFETY: plain system calls on NUL-terminated strings that outlive them;
    // they change only this process's mount namespace and working directory.
    unsafe {
        check(
            libc::unshare(libc::CLONE_NEWNS),
            "unshare the mount namespace",
        )?;
        // Nothing mounted or unmounted from here on may reach the host's namespace.
        check(
            libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_SLAVE | libc::MS_REC,
                std::ptr::null(),
            ),
            "make the mounts slaves",
        )?;
        // pivot_root needs the new root to be a mount point.
        check(
            libc::mount(
                root_c.as_ptr(),
                root_c.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            ),
            "bind-mount the jail",
        )?;
        check(libc::chdir(root_c.as_ptr()), "enter the jail")?;
        check(libc::mkdir(old.as_ptr(), 0o700), "make old_root")?;
        check(
            i32::try_from(libc::syscall(
                libc::SYS_pivot_root,
                c".".as_ptr(),
                old.as_ptr(),
            ))
            .unwrap_or(-1),
            "pivot_root into the jail",
        )?;
        check(libc::chdir(c"/".as_ptr()), "enter the new root")?;
        check(
            libc::umount2(old.as_ptr(), libc::MNT_DETACH),
            "unmount the old root",
        )?;
        check(libc::rmdir(old.as_ptr()), "remove old_root")?;
    }
    Ok(())
}

fn own(path: &CStr, uid: u32, gid: u32) -> Result<(), Failure> {
    // SAFETY: chown on a NUL-terminated path.
    if unsafe { libc::chown(path.as_ptr(), uid, gid) } != 0 {
        return Err(Failure::Chroot(format!(
            "cannot chown {}: {}",
            path.to_string_lossy(),
            os_error()
        )));
    }
    Ok(())
}

fn make_dir(path: &str, uid: u32, gid: u32) -> Result<(), Failure> {
    let fail = |e: std::io::Error| Failure::Chroot(format!("cannot make {path}: {e}"));
    std::fs::create_dir_all(path).map_err(fail)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).map_err(fail)?;
    own(&cstring(Path::new(path))?, uid, gid)
}

fn mknod(path: &CStr, major: u32, minor: u32, uid: u32, gid: u32) -> Result<(), Failure> {
    // SAFETY: mknod on a NUL-terminated path; makedev is arithmetic.
    let rc = unsafe {
        libc::mknod(
            path.as_ptr(),
            libc::S_IFCHR | libc::S_IRUSR | libc::S_IWUSR,
            libc::makedev(major, minor),
        )
    };
    if rc != 0 {
        return Err(Failure::Chroot(format!(
            "cannot make device {}: {}",
            path.to_string_lossy(),
            os_error()
        )));
    }
    own(path, uid, gid)
}

/// userfaultfd's misc minor number, from `/proc/misc` (absent on kernels without the device).
fn userfaultfd_minor() -> Option<u32> {
    let misc = std::fs::read_to_string("/proc/misc").ok()?;
    misc.lines().find_map(|line| {
        let (minor, name) = line.trim().split_once(' ')?;
        (name == "userfaultfd").then(|| minor.parse().ok())?
    })
}

/// Writes `/<exec name>.pid` in the jail: the pid of the process that will exec.
fn write_pid_file(exec_name: &str, pid: libc::pid_t) -> Result<(), Failure> {
    let path = format!("/{exec_name}.pid");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| Failure::Chroot(format!("cannot create {path}: {e}")))?;
    write!(file, "{pid}").map_err(|e| Failure::Chroot(format!("cannot write {path}: {e}")))
}

/// Builds the jail and execs the program in it; returns only on failure.
pub fn run(config: &JailConfig, times: StartTimes) -> Failure {
    match prepare_and_exec(config, times) {
        Ok(never) => match never {},
        Err(failure) => failure,
    }
}

fn prepare_and_exec(
    config: &JailConfig,
    times: StartTimes,
) -> Result<std::convert::Infallible, Failure> {
    let (exec_path, exec_name) = exec_file(&config.exec_file)?;
    let base = std::fs::canonicalize(&config.chroot_base).map_err(|e| {
        Failure::Chroot(format!(
            "cannot resolve --chroot-base-dir {}: {e}",
            config.chroot_base.display()
        ))
    })?;
    if !base.is_dir() {
        return Err(Failure::Chroot(format!(
            "{} is not a directory",
            base.display()
        )));
    }
    let root = chroot_dir(&base, &exec_name, &config.id);
    std::fs::create_dir_all(&root)
        .map_err(|e| Failure::Chroot(format!("cannot create {}: {e}", root.display())))?;
    copy_exec(&exec_path, &root.join(&exec_name), config.uid, config.gid)?;
    if let Some(netns) = &config.netns {
        join_netns(netns)?;
    }
    set_limits(&config.limits)?;
    join_cgroups(config, &exec_name).map_err(Failure::Cgroup)?;
    let dev_null = if config.daemonize {
        Some(
            std::fs::File::open("/dev/null")
                .map_err(|e| Failure::Process(format!("cannot open /dev/null: {e}")))?,
        )
    } else {
        None
    };
    let uffd_minor = userfaultfd_minor();

    pivot_into(&root)?;
    make_dir("/", config.uid, config.gid)?;
    for dir in JAIL_DIRS {
        make_dir(dir, config.uid, config.gid)?;
    }
    for dev in [&TUN, &KVM] {
        mknod(dev.path, dev.major, dev.minor, config.uid, config.gid)?;
    }
    // Best effort, as in Firecracker's jailer: only some guests' features need these.
    let _ = mknod(
        URANDOM.path,
        URANDOM.major,
        URANDOM.minor,
        config.uid,
        config.gid,
    );
    if let Some(minor) = uffd_minor {
        let _ = mknod(USERFAULTFD, MISC_MAJOR, minor, config.uid, config.gid);
    }

    let mut cpu = CpuAccount {
        ended_us: 0,
        own_start_us: times.cpu_us,
    };
    if let Some(dev_null) = &dev_null {
        process::daemonize(dev_null, &mut cpu)?;
    }
    drop(dev_null);
    if config.new_pid_ns {
        // As Firecracker's jailer: the session leader's child leads a session of its own.
        // SAFETY: getsid and getpid have no preconditions.
        let leader = !config.daemonize && unsafe { libc::getsid(0) == libc::getpid() };
        let child = process::fork_with(libc::CLONE_NEWPID, &mut cpu)?;
        if child != 0 {
            write_pid_file(&exec_name, child)?;
            process::parent_exit();
        }
        // SAFETY: setsid has no preconditions.
        if leader && unsafe { libc::setsid() } < 0 {
            return Err(Failure::Process(format!("cannot setsid: {}", os_error())));
        }
    } else {
        // SAFETY: getpid has no preconditions.
        write_pid_file(&exec_name, unsafe { libc::getpid() })?;
    }
    process::drop_privileges(config.uid, config.gid)?;
    Err(process::exec(config, &exec_name, times, &cpu))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_jail_is_named_after_exec_file_and_id() {
        assert_eq!(
            chroot_dir(Path::new("/srv/jailer"), "flick", "vm-7"),
            Path::new("/srv/jailer/flick/vm-7/root")
        );
    }
}
