//! `flick-jailer`: starts a program (flick) confined the way Firecracker's jailer confines
//! Firecracker, with the same command line: a chroot made with `pivot_root` in a new mount
//! namespace, device nodes for KVM and TAPs only, cgroups (v1 or v2), resource limits, an
//! optional network and PID namespace, no inherited file descriptors or environment, and an
//! unprivileged uid/gid. See docs/jailer.md.
//!
//! Every failure prints one `flick-jailer: error: ...` line and exits with the code of its
//! kind ([`Failure::code`]).

mod args;
mod cgroup;
mod jail;
mod process;

use std::process::ExitCode;

use args::Command;

/// Why the jailer stopped; each kind has its own exit code.
#[derive(Debug)]
pub enum Failure {
    /// The command line (exit code 2).
    Args(String),
    /// The exec file cannot be used (3).
    ExecFile(String),
    /// Making the jail's directory, files or device nodes (4).
    Chroot(String),
    /// Cgroups (5).
    Cgroup(cgroup::CgroupError),
    /// Resource limits (6).
    Rlimit(String),
    /// The network namespace (7).
    Netns(String),
    /// Forking, sessions, PID namespace, standard streams (8).
    Process(String),
    /// The mount namespace and pivot_root (9).
    Mount(String),
    /// Dropping to uid/gid (10).
    Privileges(String),
    /// The exec itself (11).
    Exec(String),
    /// Closing inherited file descriptors (12).
    Fds(String),
}

impl Failure {
    pub fn code(&self) -> u8 {
        match self {
            Failure::Args(_) => 2,
            Failure::ExecFile(_) => 3,
            Failure::Chroot(_) => 4,
            Failure::Cgroup(_) => 5,
            Failure::Rlimit(_) => 6,
            Failure::Netns(_) => 7,
            Failure::Process(_) => 8,
            Failure::Mount(_) => 9,
            Failure::Privileges(_) => 10,
            Failure::Exec(_) => 11,
            Failure::Fds(_) => 12,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Cgroup(e) => write!(f, "{e}"),
            Failure::Args(m)
            | Failure::ExecFile(m)
            | Failure::Chroot(m)
            | Failure::Rlimit(m)
            | Failure::Netns(m)
            | Failure::Process(m)
            | Failure::Mount(m)
            | Failure::Privileges(m)
            | Failure::Exec(m)
            | Failure::Fds(m) => f.write_str(m),
        }
    }
}

fn fail(failure: &Failure) -> ExitCode {
    // One line, whatever the message holds.
    let line = failure.to_string().replace('\n', " ");
    eprintln!("flick-jailer: error: {line}");
    ExitCode::from(failure.code())
}

/// Closes every fd above the standard three (none may leak into the jail) and empties the
/// environment, before anything else is opened.
fn sanitize() -> Result<(), Failure> {
    // SAFETY: close_range on fds this process does not use (nothing is open yet but 0-2).
    let rc = unsafe { libc::syscall(libc::SYS_close_range, 3, libc::c_uint::MAX, 0) };
    if rc != 0 {
        return Err(Failure::Fds(format!(
            "cannot close inherited file descriptors: {}",
            std::io::Error::last_os_error()
        )));
    }
    for (key, _) in std::env::vars_os() {
        // SAFETY: the jailer is single-threaded; nothing reads the environment concurrently.
        unsafe { std::env::remove_var(key) };
    }
    Ok(())
}

fn main() -> ExitCode {
    let times = process::StartTimes::now();
    if let Err(failure) = sanitize() {
        return fail(&failure);
    }
    let argv: Vec<String> = match std::env::args_os()
        .skip(1)
        .map(|a| a.into_string())
        .collect()
    {
        Ok(argv) => argv,
        Err(bad) => {
            return fail(&Failure::Args(format!(
                "argument {bad:?} is not valid UTF-8"
            )))
        }
    };
    match args::parse(&argv) {
        Err(e) => fail(&Failure::Args(format!("{e} (see --help)"))),
        Ok(Command::Help) => {
            print!("{}", args::USAGE);
            ExitCode::SUCCESS
        }
        Ok(Command::Version) => {
            println!("flick-jailer v{}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Ok(Command::Jail(config)) => fail(&jail::run(&config, times)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_failure_kind_has_its_own_nonzero_code() {
        let all = [
            Failure::Args(String::new()),
            Failure::ExecFile(String::new()),
            Failure::Chroot(String::new()),
            Failure::Cgroup(cgroup::CgroupError::NoHierarchy(1)),
            Failure::Rlimit(String::new()),
            Failure::Netns(String::new()),
            Failure::Process(String::new()),
            Failure::Mount(String::new()),
            Failure::Privileges(String::new()),
            Failure::Exec(String::new()),
            Failure::Fds(String::new()),
        ];
        let mut codes: Vec<u8> = all.iter().map(Failure::code).collect();
        assert!(codes.iter().all(|&c| c != 0 && c != 1));
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), all.len());
    }
}
