//! The jailer's own process: its start times and CPU time, the forks of `--daemonize` and
//! `--new-pid-ns`, dropping to uid/gid and the final exec. Runs single-threaded: it forks
//! with raw `clone`.

use std::ffi::CString;
use std::os::fd::AsRawFd;

use crate::args::JailConfig;
use crate::Failure;

fn os_error() -> std::io::Error {
    std::io::Error::last_os_error()
}

/// Times the exec file gets (`--start-time-us`, CPU time used by the jailer).
#[derive(Debug, Clone, Copy)]
pub struct StartTimes {
    /// `CLOCK_MONOTONIC` when the jailer started, in microseconds.
    pub monotonic_us: u64,
    /// This process's CPU time when the jailer started, in microseconds.
    pub cpu_us: u64,
}

fn clock_us(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clock ids used are constants.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    let positive = |n: libc::c_long| u64::try_from(n).unwrap_or(0);
    positive(ts.tv_sec) * 1_000_000 + positive(ts.tv_nsec) / 1_000
}

impl StartTimes {
    pub fn now() -> StartTimes {
        StartTimes {
            monotonic_us: clock_us(libc::CLOCK_MONOTONIC),
            cpu_us: clock_us(libc::CLOCK_PROCESS_CPUTIME_ID),
        }
    }
}

/// CPU time of the jailer: the processes that end at a fork, and the current one.
#[derive(Debug)]
pub struct CpuAccount {
    /// Used by jailer processes that ended (or end right after their fork).
    pub ended_us: u64,
    /// This process's CPU clock when it started being the jailer (0 in a forked child).
    pub own_start_us: u64,
}

impl CpuAccount {
    /// What the jailer has used so far, all processes together.
    fn total_us(&self) -> u64 {
        self.ended_us + clock_us(libc::CLOCK_PROCESS_CPUTIME_ID).saturating_sub(self.own_start_us)
    }
}

/// `fork` (with extra clone `flags`) after which the parent ends: in the child returns 0, in
/// the parent the child's pid.
pub fn fork_with(flags: libc::c_int, cpu: &mut CpuAccount) -> Result<libc::pid_t, Failure> {
    let used = cpu.total_us();
    // SAFETY: a raw clone without CLONE_VM is a fork; this process is single-threaded, so the
    // child's copy of its memory is consistent.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            libc::c_long::from(flags | libc::SIGCHLD),
            0,
            0,
            0,
            0,
        )
    };
    if pid < 0 {
        return Err(Failure::Process(format!("cannot fork: {}", os_error())));
    }
    if pid == 0 {
        cpu.ended_us = used;
        cpu.own_start_us = 0;
    }
    libc::pid_t::try_from(pid).map_err(|_| Failure::Process("bad pid from clone".into()))
}

/// Ends a parent process after a fork without running anything of the child's state.
pub fn parent_exit() -> ! {
    // SAFETY: _exit ends this process at once.
    unsafe { libc::_exit(0) }
}

pub fn daemonize(dev_null: &std::fs::File, cpu: &mut CpuAccount) -> Result<(), Failure> {
    if fork_with(0, cpu)? != 0 {
        parent_exit();
    }
    // SAFETY: setsid has no preconditions; this child is not a process group leader.
    if unsafe { libc::setsid() } < 0 {
        return Err(Failure::Process(format!("cannot setsid: {}", os_error())));
    }
    if fork_with(0, cpu)? != 0 {
        parent_exit();
    }
    for fd in 0..=2 {
        // SAFETY: dup2 onto the standard fds from an fd we own.
        if unsafe { libc::dup2(dev_null.as_raw_fd(), fd) } < 0 {
            return Err(Failure::Process(format!(
                "cannot redirect fd {fd} to /dev/null: {}",
                os_error()
            )));
        }
    }
    Ok(())
}

pub fn drop_privileges(uid: u32, gid: u32) -> Result<(), Failure> {
    let fail = |what: &str| Failure::Privileges(format!("cannot {what}: {}", os_error()));
    // SAFETY: credential system calls with plain integer arguments.
    unsafe {
        if libc::setgroups(0, std::ptr::null()) != 0 {
            return Err(fail("clear the supplementary groups"));
        }
        if libc::setresgid(gid, gid, gid) != 0 {
            return Err(fail(&format!("set the group to {gid}")));
        }
        if libc::setresuid(uid, uid, uid) != 0 {
            return Err(fail(&format!("set the user to {uid}")));
        }
    }
    Ok(())
}

/// Execs `/<exec name>` with the jailer's arguments, then the user's, and no environment.
pub fn exec(config: &JailConfig, exec_name: &str, times: StartTimes, cpu: &CpuAccount) -> Failure {
    let now_cpu = clock_us(libc::CLOCK_PROCESS_CPUTIME_ID);
    let jailer_cpu = cpu.total_us();
    let program = format!("/{exec_name}");
    let mut argv = vec![
        program.clone(),
        "--id".into(),
        config.id.clone(),
        "--start-time-us".into(),
        times.monotonic_us.to_string(),
        "--start-time-cpu-us".into(),
        now_cpu.to_string(),
        "--parent-cpu-time-us".into(),
        jailer_cpu.to_string(),
    ];
    argv.extend(config.extra_args.iter().cloned());
    let argv: Result<Vec<CString>, _> = argv.into_iter().map(CString::new).collect();
    let Ok(argv) = argv else {
        return Failure::Args("an argument for the exec file contains a NUL byte".into());
    };
    let mut pointers: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    pointers.push(std::ptr::null());
    let env: [*const libc::c_char; 1] = [std::ptr::null()];
    // SAFETY: argv and envp are NULL-terminated arrays of NUL-terminated strings that outlive
    // the call; execve only returns on failure.
    unsafe { libc::execve(argv[0].as_ptr(), pointers.as_ptr(), env.as_ptr()) };
    Failure::Exec(format!("cannot exec {program} in the jail: {}", os_error()))
}
