//! The jailer's command line: parsing and validation, with no file-system or process effects
//! (those are in `jail.rs`). Flags are Firecracker's jailer's: `--flag value` or `--flag=value`,
//! `--cgroup` and `--resource-limit` repeatable, and everything after `--` goes to the exec file.

use std::path::{Component, Path, PathBuf};

/// Longest instance id (Firecracker's limit).
pub const MAX_ID_LEN: usize = 64;
/// Where jails are made unless `--chroot-base-dir` says otherwise.
pub const DEFAULT_CHROOT_BASE: &str = "/srv/jailer";
/// `RLIMIT_NOFILE` of the jailed process unless `--resource-limit no-file=N` says otherwise
/// (Firecracker's default).
pub const DEFAULT_NO_FILE: u64 = 2048;

/// Why the command line was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ArgError {
    #[error("unknown argument {0}")]
    Unknown(String),
    #[error("--{0} needs a value")]
    MissingValue(&'static str),
    #[error("--{0} is required")]
    Missing(&'static str),
    #[error("--{0} given more than once")]
    Repeated(&'static str),
    #[error("--{0} takes no value")]
    UnexpectedValue(&'static str),
    #[error(
        "invalid instance id {0:?}: 1 to {MAX_ID_LEN} characters, ASCII letters, digits and '-'"
    )]
    Id(String),
    #[error("invalid --{0} {1:?}: a number from 0 to 4294967295")]
    Ugid(&'static str, String),
    #[error("invalid --cgroup-version {0:?}: 1 or 2")]
    CgroupVersion(String),
    #[error("invalid --cgroup {0:?}: <controller>.<file>=<value>")]
    Cgroup(String),
    #[error("invalid --parent-cgroup {0:?}: a relative path without '.' or '..'")]
    ParentCgroup(String),
    #[error("invalid --resource-limit {0:?}: fsize=<bytes> or no-file=<count>")]
    ResourceLimit(String),
    #[error("invalid --{0} {1:?}: empty")]
    Empty(&'static str, String),
}

/// A cgroup file and the value written to it (`--cgroup cpu.shares=10`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupSetting {
    /// The controller, the file name's part before the first '.' (`cpu`).
    pub controller: String,
    pub file: String,
    pub value: String,
}

/// What the jailed process may use (`setrlimit`, soft and hard limit alike).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResourceLimits {
    /// `RLIMIT_FSIZE`: the largest file the process may write, in bytes.
    pub fsize: Option<u64>,
    /// `RLIMIT_NOFILE`: one more than the highest fd number the process may open.
    pub no_file: u64,
}

/// A parsed and validated command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailConfig {
    pub id: String,
    pub exec_file: PathBuf,
    pub uid: u32,
    pub gid: u32,
    pub chroot_base: PathBuf,
    pub netns: Option<PathBuf>,
    pub cgroup_version: u8,
    pub cgroups: Vec<CgroupSetting>,
    /// The cgroup the jail's cgroup is made in (relative to each hierarchy's mount point);
    /// `None`: the exec file's name.
    pub parent_cgroup: Option<PathBuf>,
    pub limits: ResourceLimits,
    pub daemonize: bool,
    pub new_pid_ns: bool,
    /// Passed to the exec file after the jailer's own arguments.
    pub extra_args: Vec<String>,
}

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Jail(Box<JailConfig>),
    Help,
    Version,
}

/// The flags that take a value, as written after `--`.
const VALUE_FLAGS: [&str; 10] = [
    "id",
    "exec-file",
    "uid",
    "gid",
    "chroot-base-dir",
    "netns",
    "cgroup-version",
    "cgroup",
    "parent-cgroup",
    "resource-limit",
];
/// The flags that take none.
const BOOL_FLAGS: [&str; 4] = ["daemonize", "new-pid-ns", "help", "version"];

/// Collected values before validation: `(flag, value)` in command-line order.
#[derive(Debug, Default)]
struct Raw {
    values: Vec<(&'static str, String)>,
    flags: Vec<&'static str>,
    extra: Vec<String>,
}

impl Raw {
    fn single(&self, flag: &'static str) -> Result<Option<&str>, ArgError> {
        let mut found = self.values.iter().filter(|(f, _)| *f == flag);
        let first = found.next().map(|(_, v)| v.as_str());
        if found.next().is_some() {
            return Err(ArgError::Repeated(flag));
        }
        Ok(first)
    }

    fn required(&self, flag: &'static str) -> Result<&str, ArgError> {
        self.single(flag)?.ok_or(ArgError::Missing(flag))
    }

    fn all(&self, flag: &'static str) -> impl Iterator<Item = &str> {
        self.values
            .iter()
            .filter(move |(f, _)| *f == flag)
            .map(|(_, v)| v.as_str())
    }

    fn flag(&self, flag: &'static str) -> Result<bool, ArgError> {
        match self.flags.iter().filter(|f| **f == flag).count() {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(ArgError::Repeated(flag)),
        }
    }
}

fn known(list: &[&'static str], name: &str) -> Option<&'static str> {
    list.iter().copied().find(|f| *f == name)
}

/// Splits the arguments (without the program name) into flags, values and the exec file's own
/// arguments.
fn collect(args: &[String]) -> Result<Raw, ArgError> {
    let mut raw = Raw::default();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        if arg == "--" {
            raw.extra = it.cloned().collect();
            break;
        }
        let Some(body) = arg.strip_prefix("--") else {
            return Err(ArgError::Unknown(arg.clone()));
        };
        let (name, inline) = match body.split_once('=') {
            Some((name, value)) => (name, Some(value)),
            None => (body, None),
        };
        if let Some(flag) = known(&VALUE_FLAGS, name) {
            let value = match inline {
                Some(value) => value.to_string(),
                None => it.next().cloned().ok_or(ArgError::MissingValue(flag))?,
            };
            raw.values.push((flag, value));
        } else if let Some(flag) = known(&BOOL_FLAGS, name) {
            if inline.is_some() {
                return Err(ArgError::UnexpectedValue(flag));
            }
            raw.flags.push(flag);
        } else {
            return Err(ArgError::Unknown(arg.clone()));
        }
    }
    Ok(raw)
}

/// Parses the arguments after the program name.
pub fn parse(args: &[String]) -> Result<Command, ArgError> {
    let raw = collect(args)?;
    if raw.flag("help")? {
        return Ok(Command::Help);
    }
    if raw.flag("version")? {
        return Ok(Command::Version);
    }
    let id = raw.required("id")?;
    validate_id(id)?;
    let exec_file = non_empty("exec-file", raw.required("exec-file")?)?;
    let uid = parse_ugid("uid", raw.required("uid")?)?;
    let gid = parse_ugid("gid", raw.required("gid")?)?;
    let chroot_base = match raw.single("chroot-base-dir")? {
        Some(dir) => non_empty("chroot-base-dir", dir)?,
        None => PathBuf::from(DEFAULT_CHROOT_BASE),
    };
    let netns = raw
        .single("netns")?
        .map(|path| non_empty("netns", path))
        .transpose()?;
    let cgroup_version = match raw.single("cgroup-version")?.unwrap_or("1") {
        "1" => 1,
        "2" => 2,
        other => return Err(ArgError::CgroupVersion(other.into())),
    };
    let cgroups = raw
        .all("cgroup")
        .map(parse_cgroup)
        .collect::<Result<_, _>>()?;
    let parent_cgroup = raw
        .single("parent-cgroup")?
        .map(parse_parent_cgroup)
        .transpose()?;
    let mut limits = ResourceLimits {
        fsize: None,
        no_file: DEFAULT_NO_FILE,
    };
    for limit in raw.all("resource-limit") {
        parse_resource_limit(limit, &mut limits)?;
    }
    Ok(Command::Jail(Box::new(JailConfig {
        id: id.into(),
        exec_file,
        uid,
        gid,
        chroot_base,
        netns,
        cgroup_version,
        cgroups,
        parent_cgroup,
        limits,
        daemonize: raw.flag("daemonize")?,
        new_pid_ns: raw.flag("new-pid-ns")?,
        extra_args: raw.extra,
    })))
}

/// An instance id is 1 to 64 ASCII letters, digits and dashes (it names a directory and a
/// cgroup).
pub fn validate_id(id: &str) -> Result<(), ArgError> {
    let valid = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    if valid {
        Ok(())
    } else {
        Err(ArgError::Id(id.into()))
    }
}

fn non_empty(flag: &'static str, value: &str) -> Result<PathBuf, ArgError> {
    if value.is_empty() {
        return Err(ArgError::Empty(flag, value.into()));
    }
    Ok(PathBuf::from(value))
}

fn parse_ugid(flag: &'static str, value: &str) -> Result<u32, ArgError> {
    value
        .parse()
        .map_err(|_| ArgError::Ugid(flag, value.into()))
}

/// Whether `path` is a plain relative path: no root, no `.` or `..` component, not empty.
fn is_plain_relative(path: &Path) -> bool {
    path.components().next().is_some()
        && path.components().all(|c| matches!(c, Component::Normal(_)))
}

fn parse_cgroup(arg: &str) -> Result<CgroupSetting, ArgError> {
    let invalid = || ArgError::Cgroup(arg.into());
    let (file, value) = arg.split_once('=').ok_or_else(invalid)?;
    if value.is_empty() || value.contains('=') || value.contains('\n') || file.contains('/') {
        return Err(invalid());
    }
    let (controller, rest) = file.split_once('.').ok_or_else(invalid)?;
    if controller.is_empty() || rest.is_empty() || !is_plain_relative(Path::new(file)) {
        return Err(invalid());
    }
    Ok(CgroupSetting {
        controller: controller.into(),
        file: file.into(),
        value: value.into(),
    })
}

fn parse_parent_cgroup(arg: &str) -> Result<PathBuf, ArgError> {
    let path = PathBuf::from(arg);
    // `Path::components` drops "." in the middle of a path: look at the text as well.
    let dots = arg.split('/').any(|part| part == "." || part == "..");
    if !is_plain_relative(&path) || dots {
        return Err(ArgError::ParentCgroup(arg.into()));
    }
    Ok(path)
}

fn parse_resource_limit(arg: &str, limits: &mut ResourceLimits) -> Result<(), ArgError> {
    let invalid = || ArgError::ResourceLimit(arg.into());
    let (name, value) = arg.split_once('=').ok_or_else(invalid)?;
    let value: u64 = value.parse().map_err(|_| invalid())?;
    match name {
        "fsize" => limits.fsize = Some(value),
        "no-file" => limits.no_file = value,
        _ => return Err(invalid()),
    }
    Ok(())
}

/// The usage text of `--help`.
pub const USAGE: &str = "\
Usage: flick-jailer --id <id> --exec-file <path> --uid <uid> --gid <gid> [options] [-- <args>]

Makes a jail at <chroot-base-dir>/<exec file name>/<id>/root, copies the exec file into it,
and execs it there as <uid>:<gid>, confined (see docs/jailer.md).

Options:
  --id <id>                     instance id: 1-64 ASCII letters, digits and '-'
  --exec-file <path>            the program to run in the jail (e.g. flick)
  --uid <uid>, --gid <gid>      the user and group it runs as
  --chroot-base-dir <dir>       where jails are made [default: /srv/jailer]
  --netns <path>                join this network namespace (e.g. /var/run/netns/<name>)
  --cgroup-version <1|2>        the cgroup hierarchy to use [default: 1]
  --cgroup <file=value>         write value to the jail's cgroup file (repeatable)
  --parent-cgroup <path>        make the jail's cgroup under this one [default: exec file name]
  --resource-limit <res=value>  fsize=<bytes> or no-file=<count> (repeatable) [no-file: 2048]
  --daemonize                   detach: new session, standard streams on /dev/null
  --new-pid-ns                  run the program as PID 1 of a new PID namespace
  --help, --version
Arguments after -- are passed to the program after --id, --start-time-us,
--start-time-cpu-us and --parent-cpu-time-us.
";

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn base() -> Vec<String> {
        args(&[
            "--id",
            "vm-1",
            "--exec-file",
            "/usr/bin/flick",
            "--uid",
            "123",
            "--gid",
            "456",
        ])
    }

    fn jail(list: Vec<String>) -> Result<JailConfig, ArgError> {
        match parse(&list)? {
            Command::Jail(config) => Ok(*config),
            other => panic!("not a jail: {other:?}"),
        }
    }

    fn with(extra: &[&str]) -> Result<JailConfig, ArgError> {
        let mut list = base();
        list.extend(args(extra));
        jail(list)
    }

    #[test]
    fn required_flags_alone_give_firecracker_defaults() {
        let config = jail(base()).unwrap();
        assert_eq!(config.id, "vm-1");
        assert_eq!(config.exec_file, Path::new("/usr/bin/flick"));
        assert_eq!((config.uid, config.gid), (123, 456));
        assert_eq!(config.chroot_base, Path::new("/srv/jailer"));
        assert_eq!(config.cgroup_version, 1);
        assert_eq!(config.limits.no_file, 2048);
        assert_eq!(config.limits.fsize, None);
        assert!(!config.daemonize && !config.new_pid_ns);
        assert!(config.netns.is_none() && config.parent_cgroup.is_none());
        assert!(config.cgroups.is_empty() && config.extra_args.is_empty());
    }

    #[test]
    fn every_flag_is_read_in_both_spellings() {
        let config = with(&[
            "--chroot-base-dir=/tmp/j",
            "--netns",
            "/var/run/netns/a",
            "--cgroup-version=2",
            "--cgroup",
            "cpu.max=50000 100000",
            "--cgroup=pids.max=10",
            "--parent-cgroup",
            "a/b",
            "--resource-limit",
            "fsize=1024",
            "--resource-limit=no-file=64",
            "--daemonize",
            "--new-pid-ns",
        ])
        .unwrap();
        assert_eq!(config.chroot_base, Path::new("/tmp/j"));
        assert_eq!(config.netns.as_deref(), Some(Path::new("/var/run/netns/a")));
        assert_eq!(config.cgroup_version, 2);
        assert_eq!(config.cgroups.len(), 2);
        assert_eq!(config.cgroups[0].controller, "cpu");
        assert_eq!(config.cgroups[0].file, "cpu.max");
        assert_eq!(config.cgroups[0].value, "50000 100000");
        assert_eq!(config.cgroups[1].file, "pids.max");
        assert_eq!(config.parent_cgroup.as_deref(), Some(Path::new("a/b")));
        assert_eq!(
            config.limits,
            ResourceLimits {
                fsize: Some(1024),
                no_file: 64
            }
        );
        assert!(config.daemonize && config.new_pid_ns);
    }

    #[test]
    fn arguments_after_the_separator_go_to_the_exec_file_unparsed() {
        let config = with(&["--", "--api-sock", "/run/api.sock", "--id", "x"]).unwrap();
        assert_eq!(
            config.extra_args,
            args(&["--api-sock", "/run/api.sock", "--id", "x"])
        );
    }

    #[test]
    fn ids_must_be_short_and_alphanumeric_with_dashes() {
        for good in ["a", "551e7604-e35c-42b3-b825-416853441234", &"x".repeat(64)] {
            assert_eq!(validate_id(good), Ok(()), "{good}");
        }
        for bad in ["", "a_b", "a/b", "..", "a b", "é", &"x".repeat(65)] {
            assert!(validate_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn missing_required_flags_are_named() {
        for flag in ["id", "exec-file", "uid", "gid"] {
            let mut list = base();
            let at = list.iter().position(|a| a == &format!("--{flag}")).unwrap();
            list.drain(at..at + 2);
            assert_eq!(jail(list), Err(ArgError::Missing(flag)), "{flag}");
        }
    }

    #[test]
    fn malformed_command_lines_are_refused() {
        let cases: Vec<(Vec<&str>, ArgError)> = vec![
            (vec!["--bogus"], ArgError::Unknown("--bogus".into())),
            (vec!["stray"], ArgError::Unknown("stray".into())),
            (vec!["--netns"], ArgError::MissingValue("netns")),
            (vec!["--id", "other"], ArgError::Repeated("id")),
            (
                vec!["--daemonize", "--daemonize"],
                ArgError::Repeated("daemonize"),
            ),
            (
                vec!["--daemonize=1"],
                ArgError::UnexpectedValue("daemonize"),
            ),
            (
                vec!["--cgroup-version", "3"],
                ArgError::CgroupVersion("3".into()),
            ),
            (vec!["--netns="], ArgError::Empty("netns", String::new())),
        ];
        for (extra, expected) in cases {
            assert_eq!(with(&extra), Err(expected), "{extra:?}");
        }
        let mut list = base();
        list[5] = "-1".into();
        assert_eq!(jail(list), Err(ArgError::Ugid("uid", "-1".into())));
    }

    #[test]
    fn cgroup_settings_need_a_controller_file_and_value() {
        for bad in [
            "cpu.shares",
            "cpu.shares=",
            "shares=10",
            ".shares=10",
            "cpu.=10",
            "../cpu.shares=10",
            "a/cpu.shares=10",
            "cpu.shares=1=2",
        ] {
            assert_eq!(
                with(&["--cgroup", bad]),
                Err(ArgError::Cgroup(bad.into())),
                "{bad}"
            );
        }
    }

    #[test]
    fn parent_cgroups_must_stay_below_the_mount_point() {
        for bad in ["/abs", "..", "a/../b", "./a", "a/./b", ""] {
            assert_eq!(
                with(&["--parent-cgroup", bad]),
                Err(ArgError::ParentCgroup(bad.into())),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn resource_limits_know_fsize_and_no_file_only() {
        for bad in ["nproc=10", "fsize", "fsize=-1", "no-file=lots"] {
            assert_eq!(
                with(&["--resource-limit", bad]),
                Err(ArgError::ResourceLimit(bad.into())),
                "{bad}"
            );
        }
    }

    #[test]
    fn help_and_version_need_nothing_else() {
        assert_eq!(parse(&args(&["--help"])), Ok(Command::Help));
        assert_eq!(parse(&args(&["--version"])), Ok(Command::Version));
    }
}
