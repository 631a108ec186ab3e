//! The VMM's error type: every way an [`Action`](crate::control::Action) can fail, each with its
//! class for the reply ([`ErrorClass`]): the request is wrong, it is not allowed in the VM's
//! state, or the VMM failed. `Vmm::handle` turns it into the one-line `fault_message`.

use super::builder::BuildError;
use super::lifecycle::StateError;
use super::registry::RegistryError;
use super::snapshot::SnapshotOpError;
use crate::config::ConfigError;
use crate::control::{ActionError, ErrorClass};
use crate::devices::virtio::DeviceError;
use crate::kvm::vcpu::VcpuError;
use crate::logger::LoggerError;

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error(transparent)]
    Devices(#[from] RegistryError),
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotOpError),
    #[error(transparent)]
    Logger(#[from] LoggerError),
    #[error("cannot open serial_out_path {0}")]
    SerialOut(String, #[source] std::io::Error),
    #[error("a snapshot must be loaded into a fresh flick, before any boot-source or drive is configured")]
    LoadIntoConfigured,
    #[error("no metrics file configured (PUT /metrics)")]
    NoMetricsPath,
    #[error("cannot write metrics to {0}")]
    WriteMetrics(String, #[source] std::io::Error),
    #[error("cannot open metrics file {0}")]
    OpenMetrics(String, #[source] std::io::Error),
    #[error("metrics are already configured; they can be set once per process")]
    MetricsConfigured,
    #[error("the keyboard buffer is full; try again")]
    KeyboardFull,
    #[error("SendCtrlAltDel is not available on {0}")]
    NoKeyboard(&'static str),
    #[error("cannot {action} the VM")]
    Vcpus {
        action: &'static str,
        #[source]
        source: VcpuError,
    },
    #[error("{0} is not supported by flick yet")]
    NotSupported(&'static str),
    #[error("invalid uds_path {0}: it already exists")]
    UdsPathExists(String),
    #[error("no balloon device is configured (PUT /balloon before boot)")]
    NoBalloon,
    #[error("cannot encode the reply")]
    Encode(#[source] serde_json::Error),
    #[error("MMDS error")]
    Mmds(#[source] crate::mmds::MmdsError),
    #[error("MMDS limit exceeded error")]
    MmdsLimit(#[source] crate::mmds::MmdsError),
}

impl From<crate::mmds::MmdsError> for VmmError {
    fn from(e: crate::mmds::MmdsError) -> Self {
        match e {
            crate::mmds::MmdsError::TooLarge => VmmError::MmdsLimit(e),
            e => VmmError::Mmds(e),
        }
    }
}

impl VmmError {
    /// How the client is told.
    pub fn class(&self) -> ErrorClass {
        let internal = match self {
            VmmError::State(_) => return ErrorClass::NotAllowed,
            VmmError::MmdsLimit(_) => return ErrorClass::TooLarge,
            VmmError::Device(e) => e.is_internal(),
            VmmError::Devices(e) => e.is_internal(),
            VmmError::Build(e) => e.is_internal(),
            VmmError::Snapshot(e) => e.is_internal(),
            VmmError::Vcpus { .. } | VmmError::Encode(_) => true,
            _ => false,
        };
        if internal {
            ErrorClass::Internal
        } else {
            ErrorClass::BadRequest
        }
    }

    /// The reply's error: class and one-line message.
    pub fn to_action_error(&self) -> ActionError {
        ActionError {
            class: self.class(),
            message: crate::error_chain(self),
        }
    }
}
