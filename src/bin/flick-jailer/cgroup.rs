//! The jail's cgroup: find the hierarchies in `/proc/self/mountinfo` (v1 controllers each on
//! their own mount, or the v2 unified mount; a hybrid host has both), make
//! `<mount>/<parent>/<id>`, write the `--cgroup` values there and move this process in.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::args::CgroupSetting;

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cannot read {0}: {1}")]
    Mounts(&'static str, std::io::Error),
    #[error("no cgroup v{0} hierarchy is mounted")]
    NoHierarchy(u8),
    #[error("cgroup controller {0} is not available (not mounted, or not in {1})")]
    Controller(String, String),
    #[error("cannot create cgroup {0}: {1}")]
    Create(PathBuf, std::io::Error),
    #[error("cannot write {1:?} to {0}: {2}")]
    Write(PathBuf, String, std::io::Error),
    #[error("cannot read {0}: {1}")]
    Read(PathBuf, std::io::Error),
}

/// One cgroup file system mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupMount {
    pub path: PathBuf,
    /// 1 (`cgroup`) or 2 (`cgroup2`).
    pub version: u8,
    /// The super-block options (for v1, they name the controllers: `rw,cpu,cpuacct`).
    pub options: Vec<String>,
}

/// Undoes the octal escapes (`\040` for a space) of a mountinfo field.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let digits = bytes.get(i + 1..i + 4);
        match digits {
            Some(d) if bytes[i] == b'\\' && d.iter().all(|b| (b'0'..=b'7').contains(b)) => {
                let value = d.iter().fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
                out.push(u8::try_from(value).unwrap_or(b'?'));
                i += 4;
            }
            _ => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup mounts listed in a mountinfo text (`proc(5)`: `... mount-point options
/// [optional...] - fstype source super-options`).
pub fn parse_mountinfo(text: &str) -> Vec<CgroupMount> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mount_point = left.split(' ').nth(4)?;
            let mut right = right.split(' ');
            let version = match right.next()? {
                "cgroup" => 1,
                "cgroup2" => 2,
                _ => return None,
            };
            let options = right.nth(1).unwrap_or("");
            Some(CgroupMount {
                path: PathBuf::from(unescape(mount_point)),
                version,
                options: options.split(',').map(str::to_string).collect(),
            })
        })
        .collect()
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, format!("{value}\n"))
        .map_err(|e| CgroupError::Write(path.to_path_buf(), value.into(), e))
}

fn read(path: &Path) -> Result<String, CgroupError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|e| CgroupError::Read(path.to_path_buf(), e))
}

/// Where the jail's cgroups go: one directory per hierarchy, and the values for each.
#[derive(Debug)]
pub struct CgroupPlan {
    /// The jail's cgroup directory in each hierarchy, with its settings.
    pub groups: BTreeMap<PathBuf, Vec<CgroupSetting>>,
    /// The mount point each directory is under.
    mounts: BTreeMap<PathBuf, PathBuf>,
    version: u8,
}

/// Plans the cgroups for `settings` in the hierarchies of `mounts`.
pub fn plan(
    mounts: &[CgroupMount],
    version: u8,
    parent: &Path,
    id: &str,
    settings: &[CgroupSetting],
) -> Result<CgroupPlan, CgroupError> {
    let mut plan = CgroupPlan {
        groups: BTreeMap::new(),
        mounts: BTreeMap::new(),
        version,
    };
    let unified = mounts.iter().find(|m| m.version == 2);
    if version == 2 && unified.is_none() || version == 1 && !mounts.iter().any(|m| m.version == 1) {
        return Err(CgroupError::NoHierarchy(version));
    }
    for setting in settings {
        let mount = if version == 1 {
            mounts
                .iter()
                .find(|m| m.version == 1 && m.options.contains(&setting.controller))
                .ok_or_else(|| {
                    CgroupError::Controller(setting.controller.clone(), "the v1 mounts".into())
                })?
        } else {
            let unified = unified.ok_or(CgroupError::NoHierarchy(2))?;
            let list = unified.path.join("cgroup.controllers");
            let available = read(&list)?;
            if !available.split(' ').any(|c| c == setting.controller) {
                return Err(CgroupError::Controller(
                    setting.controller.clone(),
                    list.display().to_string(),
                ));
            }
            unified
        };
        let dir = mount.path.join(parent).join(id);
        plan.mounts.insert(dir.clone(), mount.path.clone());
        plan.groups.entry(dir).or_default().push(setting.clone());
    }
    Ok(plan)
}

impl CgroupPlan {
    /// Makes the cgroups, writes their values, then moves this process into each.
    pub fn apply(&self) -> Result<(), CgroupError> {
        for (dir, settings) in &self.groups {
            std::fs::create_dir_all(dir).map_err(|e| CgroupError::Create(dir.clone(), e))?;
            let mount = &self.mounts[dir];
            for setting in settings {
                if self.version == 2 {
                    enable_controller(mount, dir, &setting.controller)?;
                } else {
                    inherit_empty(mount, dir, &setting.file)?;
                }
                write(&dir.join(&setting.file), &setting.value)?;
            }
        }
        for dir in self.groups.keys() {
            write(&dir.join("cgroup.procs"), &std::process::id().to_string())?;
        }
        Ok(())
    }
}

/// The directories from just below `mount` down to `dir`, top first.
fn levels(mount: &Path, dir: &Path) -> Vec<PathBuf> {
    let below = dir.strip_prefix(mount).unwrap_or(Path::new(""));
    let mut path = mount.to_path_buf();
    below
        .components()
        .map(|c| {
            path.push(c);
            path.clone()
        })
        .collect()
}

/// v2: a controller's files exist in a cgroup only when its parent delegates the controller
/// (`+name` in `cgroup.subtree_control`), and so on up to the mount point.
fn enable_controller(mount: &Path, dir: &Path, controller: &str) -> Result<(), CgroupError> {
    let mut parents = vec![mount.to_path_buf()];
    parents.extend(levels(mount, dir));
    parents.pop(); // the jail's own cgroup delegates nothing
    for parent in parents {
        let control = parent.join("cgroup.subtree_control");
        let enabled = read(&control)?;
        if !enabled.split(' ').any(|c| c == controller) {
            write(&control, &format!("+{controller}"))?;
        }
    }
    Ok(())
}

/// v1: some files start empty in a new cgroup and must be set before a process may join
/// (`cpuset.cpus`, `cpuset.mems`): fill each empty level from its parent, top down.
fn inherit_empty(mount: &Path, dir: &Path, file: &str) -> Result<(), CgroupError> {
    let mut parent = mount.to_path_buf();
    for level in levels(mount, dir) {
        let path = level.join(file);
        if path.exists() && read(&path)?.is_empty() {
            let value = read(&parent.join(file))?;
            if !value.is_empty() {
                write(&path, &value)?;
            }
        }
        parent = level;
    }
    Ok(())
}

/// With `--cgroup-version 2` and no `--cgroup`, Firecracker's jailer moves itself into the
/// parent cgroup when that exists; so does this one.
pub fn join_v2_parent(mounts: &[CgroupMount], parent: &Path) -> Result<(), CgroupError> {
    let Some(unified) = mounts.iter().find(|m| m.version == 2) else {
        return Err(CgroupError::NoHierarchy(2));
    };
    let dir = unified.path.join(parent);
    if dir.is_dir() {
        write(&dir.join("cgroup.procs"), &std::process::id().to_string())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:9 - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
50 23 0:40 / /mnt/odd\\040name rw - cgroup cgroup rw,freezer
";

    fn setting(file: &str, value: &str) -> CgroupSetting {
        CgroupSetting {
            controller: file.split('.').next().unwrap().into(),
            file: file.into(),
            value: value.into(),
        }
    }

    #[test]
    fn mountinfo_yields_every_cgroup_mount_with_its_controllers() {
        let mounts = parse_mountinfo(HYBRID);
        assert_eq!(mounts.len(), 6);
        assert_eq!(mounts[0].path, Path::new("/sys/fs/cgroup/cpu,cpuacct"));
        assert_eq!(mounts[0].version, 1);
        assert_eq!(mounts[0].options, ["rw", "cpu", "cpuacct"]);
        assert_eq!(mounts[4].path, Path::new("/sys/fs/cgroup/unified"));
        assert_eq!(mounts[4].version, 2);
        assert_eq!(mounts[5].path, Path::new("/mnt/odd name"));
    }

    #[test]
    fn v1_settings_go_to_the_mount_of_their_controller() {
        let mounts = parse_mountinfo(HYBRID);
        let settings = [
            setting("cpuacct.usage", "0"),
            setting("pids.max", "10"),
            setting("cpu.shares", "2"),
        ];
        let plan = plan(&mounts, 1, Path::new("flick"), "a1", &settings).unwrap();
        let dirs: Vec<_> = plan.groups.keys().cloned().collect();
        assert_eq!(
            dirs,
            [
                PathBuf::from("/sys/fs/cgroup/cpu,cpuacct/flick/a1"),
                PathBuf::from("/sys/fs/cgroup/pids/flick/a1"),
            ]
        );
        assert_eq!(
            plan.groups[&dirs[0]],
            [settings[0].clone(), settings[2].clone()]
        );
    }

    #[test]
    fn an_unmounted_controller_is_refused() {
        let mounts = parse_mountinfo(HYBRID);
        let err = plan(
            &mounts,
            1,
            Path::new("p"),
            "a",
            &[setting("blkio.weight", "1")],
        );
        assert!(matches!(err, Err(CgroupError::Controller(c, _)) if c == "blkio"));
    }

    #[test]
    fn a_missing_hierarchy_is_refused() {
        let v1_only: Vec<_> = parse_mountinfo(HYBRID)
            .into_iter()
            .filter(|m| m.version == 1)
            .collect();
        let err = plan(&v1_only, 2, Path::new("p"), "a", &[]);
        assert!(matches!(err, Err(CgroupError::NoHierarchy(2))));
    }

    #[test]
    fn levels_run_from_below_the_mount_down_to_the_cgroup() {
        assert_eq!(
            levels(Path::new("/m"), Path::new("/m/a/b/id")),
            [
                PathBuf::from("/m/a"),
                PathBuf::from("/m/a/b"),
                PathBuf::from("/m/a/b/id")
            ]
        );
    }

    #[test]
    fn empty_v1_files_are_filled_from_the_parent_before_writing() {
        let dir = std::env::temp_dir().join(format!("flick-jailer-cg-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("p/id")).unwrap();
        std::fs::write(dir.join("cpuset.mems"), "0\n").unwrap();
        std::fs::write(dir.join("p/cpuset.mems"), "\n").unwrap();
        std::fs::write(dir.join("p/id/cpuset.mems"), "").unwrap();
        inherit_empty(&dir, &dir.join("p/id"), "cpuset.mems").unwrap();
        let p = std::fs::read_to_string(dir.join("p/cpuset.mems")).unwrap();
        let id = std::fs::read_to_string(dir.join("p/id/cpuset.mems")).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!((p.as_str(), id.as_str()), ("0\n", "0\n"));
    }
}
