//! The one contract between the outside world (HTTP API, config file, CLI) and the VMM thread.
//!
//! Every request becomes an [`Action`]; the VMM answers each with a [`Reply`]. The API thread sends
//! them over a [`ControlHandle`] (an mpsc channel plus an eventfd that wakes the VMM's event loop)
//! and waits on a per-request reply channel. The config file uses the same actions, applied
//! directly on the VMM thread. Imports only `config`.

use std::sync::mpsc;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::config::{
    BalloonConfig, BalloonStatsUpdate, BalloonUpdate, BootSourceConfig, DriveConfig, EntropyConfig,
    LoggerConfig, MachineConfig, MachineConfigUpdate, MetricsConfig, MmdsConfig, NetConfig,
    RateLimiterConfig, SerialConfig, SnapshotCreateConfig, SnapshotLoadConfig, VmConfig,
    VsockConfig,
};

/// `PATCH /drives/{id}` body.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveUpdate {
    pub drive_id: String,
    #[serde(default)]
    pub path_on_host: Option<String>,
    #[serde(default)]
    pub rate_limiter: Option<RateLimiterConfig>,
}

/// `PATCH /network-interfaces/{id}` body.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetUpdate {
    pub iface_id: String,
    #[serde(default)]
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    #[serde(default)]
    pub tx_rate_limiter: Option<RateLimiterConfig>,
}

/// Something asked of the VMM.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    GetInstanceInfo,
    GetVersion,
    GetVmConfig,
    GetMachineConfig,
    GetMetrics,
    PutMachineConfig(MachineConfig),
    PatchMachineConfig(MachineConfigUpdate),
    PutBootSource(BootSourceConfig),
    PutDrive(DriveConfig),
    PatchDrive(DriveUpdate),
    PutNetworkInterface(NetConfig),
    PatchNetworkInterface(NetUpdate),
    PutLogger(LoggerConfig),
    PutMetrics(MetricsConfig),
    PutVsock(VsockConfig),
    PutSerial(SerialConfig),
    PutEntropy(EntropyConfig),
    PutBalloon(BalloonConfig),
    PatchBalloon(BalloonUpdate),
    PatchBalloonStats(BalloonStatsUpdate),
    GetBalloon,
    GetBalloonStats,
    InstanceStart,
    SendCtrlAltDel,
    FlushMetrics,
    Pause,
    Resume,
    CreateSnapshot(SnapshotCreateConfig),
    LoadSnapshot(SnapshotLoadConfig),
    GetMmds,
    /// Replaces the MMDS document.
    PutMmds(serde_json::Value),
    /// Applies a JSON merge patch to the MMDS document.
    PatchMmds(serde_json::Value),
    PutMmdsConfig(MmdsConfig),
}

impl Action {
    /// The actions that configure a VM as described by a config file, in a valid order.
    pub fn from_config(config: &VmConfig) -> Vec<Action> {
        let mut actions = Vec::new();
        if let Some(logger) = &config.logger {
            actions.push(Action::PutLogger(logger.clone()));
        }
        if let Some(metrics) = &config.metrics {
            actions.push(Action::PutMetrics(metrics.clone()));
        }
        actions.push(Action::PutMachineConfig(config.machine_config.clone()));
        if let Some(boot) = &config.boot_source {
            actions.push(Action::PutBootSource(boot.clone()));
        }
        actions.extend(config.drives.iter().cloned().map(Action::PutDrive));
        actions.extend(
            config
                .network_interfaces
                .iter()
                .cloned()
                .map(Action::PutNetworkInterface),
        );
        if let Some(mmds) = &config.mmds_config {
            actions.push(Action::PutMmdsConfig(mmds.clone()));
        }
        if let Some(serial) = &config.serial {
            actions.push(Action::PutSerial(serial.clone()));
        }
        if let Some(vsock) = &config.vsock {
            actions.push(Action::PutVsock(vsock.clone()));
        }
        if let Some(entropy) = &config.entropy {
            actions.push(Action::PutEntropy(*entropy));
        }
        if let Some(balloon) = &config.balloon {
            actions.push(Action::PutBalloon(*balloon));
        }
        actions
    }
}

/// Why an action was not done, as the client sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The request itself is wrong: bad values, missing files, unknown ids (HTTP 400).
    BadRequest,
    /// The request is fine but not allowed in the VM's current state (HTTP 400).
    NotAllowed,
    /// The VMM or the host failed while carrying it out (HTTP 500; also logged).
    Internal,
    /// The request would make something exceed its size limit (HTTP 413).
    TooLarge,
}

impl ErrorClass {
    /// The HTTP status code of this class.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorClass::BadRequest | ErrorClass::NotAllowed => 400,
            ErrorClass::Internal => 500,
            ErrorClass::TooLarge => 413,
        }
    }
}

/// A refused or failed action: its class and the one-line message for the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ActionError {
    pub class: ErrorClass,
    pub message: String,
}

impl ActionError {
    /// An internal failure with `message`.
    pub fn internal(message: impl Into<String>) -> Self {
        ActionError {
            class: ErrorClass::Internal,
            message: message.into(),
        }
    }
}

/// What the VMM answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Done, nothing to say (HTTP 204).
    Empty,
    /// Done, with a JSON body (HTTP 200).
    Json(String),
    /// Done, with a plain-text body (HTTP 200), e.g. Prometheus metrics.
    Text(String),
    /// Refused or failed; the message becomes `fault_message`.
    Error(ActionError),
}

/// One request in flight from the API thread.
#[derive(Debug)]
pub struct Request {
    pub action: Action,
    pub reply: mpsc::SyncSender<Reply>,
}

/// The API thread's end of the channel to the VMM thread.
#[derive(Debug)]
pub struct ControlHandle {
    sender: mpsc::Sender<Request>,
    wake: EventFd,
}

/// The VMM thread's end: the eventfd it polls and the queue it drains.
#[derive(Debug)]
pub struct ControlReceiver {
    pub receiver: mpsc::Receiver<Request>,
    pub wake: EventFd,
}

/// Creates a connected handle/receiver pair.
pub fn channel() -> std::io::Result<(ControlHandle, ControlReceiver)> {
    let (sender, receiver) = mpsc::channel();
    let wake = EventFd::new(EFD_NONBLOCK)?;
    let handle = ControlHandle {
        sender,
        wake: wake.try_clone()?,
    };
    Ok((handle, ControlReceiver { receiver, wake }))
}

impl ControlHandle {
    /// Sends `action` and waits for the VMM's reply.
    pub fn call(&self, action: Action) -> Reply {
        let (tx, rx) = mpsc::sync_channel(1);
        let gone = || Reply::Error(ActionError::internal("the VMM is shutting down"));
        if self.sender.send(Request { action, reply: tx }).is_err() {
            return gone();
        }
        if self.wake.write(1).is_err() {
            return Reply::Error(ActionError::internal("cannot wake the VMM thread"));
        }
        rx.recv().unwrap_or_else(|_| gone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_actions_put_machine_config_before_devices() {
        let cfg = VmConfig::from_json(
            r#"{"boot-source": {"kernel_image_path": "/k"},
                "drives": [{"drive_id": "a", "path_on_host": "/a", "is_root_device": true,
                            "is_read_only": true}]}"#,
        )
        .unwrap();
        let actions = Action::from_config(&cfg);
        assert!(matches!(actions[0], Action::PutMachineConfig(_)));
        assert!(matches!(actions[1], Action::PutBootSource(_)));
        assert!(matches!(actions[2], Action::PutDrive(_)));
    }

    #[test]
    fn call_returns_the_reply_sent_by_the_vmm_side() {
        let (handle, rx) = channel().unwrap();
        let vmm = std::thread::spawn(move || {
            let req = rx.receiver.recv().unwrap();
            // The caller signals the eventfd right after queueing the request.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while rx.wake.read().is_err() {
                assert!(std::time::Instant::now() < deadline, "no wake-up signalled");
                std::thread::yield_now();
            }
            req.reply
                .send(Reply::Json(format!("{:?}", req.action)))
                .unwrap();
        });
        let reply = handle.call(Action::GetVersion);
        vmm.join().unwrap();
        assert_eq!(reply, Reply::Json("GetVersion".into()));
    }
}
