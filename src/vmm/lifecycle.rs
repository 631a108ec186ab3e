//! The VM's lifecycle and which action is allowed in which state: pure rules, no I/O, so they are
//! unit-tested without KVM.
//!
//! `NotStarted → Running ⇄ Paused → Exited`. Runs on the VMM thread; imports only `control`.

use crate::control::Action;

/// Where the VM is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmState {
    NotStarted,
    Running,
    Paused,
    Exited,
}

impl VmState {
    /// Firecracker's names for `GET /`.
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::NotStarted => "Not started",
            VmState::Running => "Running",
            VmState::Paused => "Paused",
            VmState::Exited => "Exited",
        }
    }
}

/// When an action may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// In any state.
    Any,
    /// Only before InstanceStart (or a snapshot load).
    BeforeStart,
    /// Only once the VM exists (running or paused).
    AfterStart,
    /// Only while the vCPUs are paused.
    WhilePaused,
}

/// An action refused because of the VM's state; the message uses Firecracker's wording too.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("{0} is only allowed before the VM starts (the requested operation is not supported after starting the microVM)")]
    AfterStart(&'static str),
    #[error("{0} is only allowed after the VM starts (the requested operation is not supported before starting the microVM)")]
    BeforeStart(&'static str),
    #[error("snapshots can only be created while the VM is paused")]
    NotPaused,
    #[error("{0} is not allowed: the VM has exited")]
    Exited(&'static str),
}

/// The name clients know an action by, for messages.
pub fn action_name(action: &Action) -> &'static str {
    match action {
        Action::GetInstanceInfo => "GET /",
        Action::GetVersion => "GET /version",
        Action::GetVmConfig => "GET /vm/config",
        Action::GetMachineConfig => "GET /machine-config",
        Action::GetMetrics => "GET /metrics",
        Action::PutMachineConfig(_) => "PUT /machine-config",
        Action::PatchMachineConfig(_) => "PATCH /machine-config",
        Action::PutBootSource(_) => "PUT /boot-source",
        Action::PutDrive(_) => "PUT /drives",
        Action::PatchDrive(_) => "PATCH /drives",
        Action::PutNetworkInterface(_) => "PUT /network-interfaces",
        Action::PatchNetworkInterface(_) => "PATCH /network-interfaces",
        Action::PutLogger(_) => "PUT /logger",
        Action::PutMetrics(_) => "PUT /metrics",
        Action::PutVsock(_) => "PUT /vsock",
        Action::PutSerial(_) => "PUT /serial",
        Action::PutEntropy(_) => "PUT /entropy",
        Action::PutBalloon(_) => "PUT /balloon",
        Action::PatchBalloon(_) => "PATCH /balloon",
        Action::PatchBalloonStats(_) => "PATCH /balloon/statistics",
        Action::GetBalloon => "GET /balloon",
        Action::GetBalloonStats => "GET /balloon/statistics",
        Action::InstanceStart => "InstanceStart",
        Action::SendCtrlAltDel => "SendCtrlAltDel",
        Action::FlushMetrics => "FlushMetrics",
        Action::Pause => "Pausing",
        Action::Resume => "Resuming",
        Action::CreateSnapshot(_) => "Creating a snapshot",
        Action::LoadSnapshot(_) => "Loading a snapshot",
        Action::GetMmds => "GET /mmds",
        Action::PutMmds(_) => "PUT /mmds",
        Action::PatchMmds(_) => "PATCH /mmds",
        Action::PutMmdsConfig(_) => "PUT /mmds/config",
    }
}

fn phase(action: &Action) -> Phase {
    match action {
        Action::GetInstanceInfo
        | Action::GetVersion
        | Action::GetVmConfig
        | Action::GetMachineConfig
        | Action::GetMetrics
        | Action::GetBalloon
        | Action::GetMmds
        | Action::PutMmds(_)
        | Action::PatchMmds(_) => Phase::Any,
        Action::PutMachineConfig(_)
        | Action::PatchMachineConfig(_)
        | Action::PutBootSource(_)
        | Action::PutDrive(_)
        | Action::PutNetworkInterface(_)
        | Action::PutLogger(_)
        | Action::PutMetrics(_)
        | Action::PutVsock(_)
        | Action::PutSerial(_)
        | Action::PutEntropy(_)
        | Action::PutBalloon(_)
        | Action::PutMmdsConfig(_)
        | Action::InstanceStart
        | Action::LoadSnapshot(_) => Phase::BeforeStart,
        Action::PatchDrive(_)
        | Action::PatchNetworkInterface(_)
        | Action::PatchBalloon(_)
        | Action::PatchBalloonStats(_)
        | Action::GetBalloonStats
        | Action::SendCtrlAltDel
        | Action::FlushMetrics
        | Action::Pause
        | Action::Resume => Phase::AfterStart,
        Action::CreateSnapshot(_) => Phase::WhilePaused,
    }
}

/// Whether `action` may run while the VM is in `state`.
pub fn check(action: &Action, state: VmState) -> Result<(), StateError> {
    let name = action_name(action);
    match (phase(action), state) {
        (Phase::Any, _) => Ok(()),
        (_, VmState::Exited) => Err(StateError::Exited(name)),
        (Phase::BeforeStart, VmState::NotStarted) => Ok(()),
        (Phase::BeforeStart, _) => Err(StateError::AfterStart(name)),
        (Phase::AfterStart | Phase::WhilePaused, VmState::NotStarted) => {
            Err(StateError::BeforeStart(name))
        }
        (Phase::WhilePaused, VmState::Running) => Err(StateError::NotPaused),
        (Phase::AfterStart | Phase::WhilePaused, _) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{MachineConfig, SnapshotCreateConfig};

    fn snapshot_create() -> Action {
        Action::CreateSnapshot(SnapshotCreateConfig {
            snapshot_path: "s".into(),
            mem_file_path: "m".into(),
            snapshot_type: Default::default(),
        })
    }

    #[test]
    fn queries_are_allowed_in_every_state() {
        for state in [
            VmState::NotStarted,
            VmState::Running,
            VmState::Paused,
            VmState::Exited,
        ] {
            assert_eq!(check(&Action::GetInstanceInfo, state), Ok(()));
            assert_eq!(check(&Action::GetMetrics, state), Ok(()));
        }
    }

    #[test]
    fn configuration_is_refused_once_started() {
        let put = Action::PutMachineConfig(MachineConfig::default());
        assert_eq!(check(&put, VmState::NotStarted), Ok(()));
        let refused = check(&put, VmState::Running).unwrap_err();
        assert_eq!(refused, StateError::AfterStart("PUT /machine-config"));
        assert!(refused.to_string().contains("not supported after starting"));
        assert!(check(&Action::InstanceStart, VmState::Paused).is_err());
    }

    #[test]
    fn runtime_actions_are_refused_before_start() {
        for action in [Action::Pause, Action::Resume, Action::FlushMetrics] {
            let refused = check(&action, VmState::NotStarted).unwrap_err();
            assert!(
                refused.to_string().contains("after the VM starts"),
                "{refused}"
            );
            assert_eq!(check(&action, VmState::Running), Ok(()));
            assert_eq!(check(&action, VmState::Paused), Ok(()));
        }
    }

    #[test]
    fn snapshots_need_a_paused_vm() {
        let create = snapshot_create();
        assert_eq!(check(&create, VmState::Running), Err(StateError::NotPaused));
        assert_eq!(check(&create, VmState::Paused), Ok(()));
        assert!(matches!(
            check(&create, VmState::NotStarted),
            Err(StateError::BeforeStart(_))
        ));
    }

    #[test]
    fn nothing_but_queries_after_exit() {
        assert_eq!(
            check(&Action::Resume, VmState::Exited),
            Err(StateError::Exited("Resuming"))
        );
        assert!(check(&Action::InstanceStart, VmState::Exited).is_err());
    }
}
