//! Routing: method, path and body of a request → the [`Action`] to ask of the VMM, or the
//! `fault_message` of a `400` answer.
//!
//! Pure functions following Firecracker's API (paths, bodies, id rules and error texts); no I/O.
//! Runs on the API connection threads. Imports `config` and `control` only.

use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::config::{
    describe_json_error, validate_id, BalloonConfig, BalloonStatsUpdate, BalloonUpdate,
    BootSourceConfig, DriveConfig, EntropyConfig, LoggerConfig, MachineConfig, MachineConfigUpdate,
    MetricsConfig, MmdsConfig, NetConfig, SerialConfig, SnapshotCreateConfig, SnapshotLoadConfig,
    VsockConfig,
};
use crate::control::{Action, DriveUpdate, NetUpdate};

pub const EMPTY_ID: &str = "The ID cannot be empty.";
pub const INVALID_ID: &str =
    "API Resource IDs can only contain alphanumeric characters and underscores.";
pub const ID_MISMATCH: &str = "The id from the path does not match the id from the body!";

/// The API's endpoints, as labels for metrics. Ids in paths are folded into `{id}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Root,
    Version,
    VmConfig,
    Vm,
    MachineConfig,
    BootSource,
    Drives,
    NetworkInterfaces,
    Actions,
    Logger,
    Metrics,
    Vsock,
    Balloon,
    Mmds,
    /// Anything else, including paths flick does not serve.
    Other,
}

impl Endpoint {
    pub const ALL: [Endpoint; 15] = [
        Endpoint::Root,
        Endpoint::Version,
        Endpoint::VmConfig,
        Endpoint::Vm,
        Endpoint::MachineConfig,
        Endpoint::BootSource,
        Endpoint::Drives,
        Endpoint::NetworkInterfaces,
        Endpoint::Actions,
        Endpoint::Logger,
        Endpoint::Metrics,
        Endpoint::Vsock,
        Endpoint::Balloon,
        Endpoint::Mmds,
        Endpoint::Other,
    ];

    /// Which endpoint `path` addresses.
    pub fn of(path: &str) -> Endpoint {
        let Some(segments) = segments(path) else {
            return Endpoint::Other;
        };
        match segments.as_slice() {
            [""] => Endpoint::Root,
            ["version"] => Endpoint::Version,
            ["vm", "config"] => Endpoint::VmConfig,
            ["vm"] => Endpoint::Vm,
            ["machine-config"] => Endpoint::MachineConfig,
            ["boot-source"] => Endpoint::BootSource,
            ["drives"] | ["drives", _] => Endpoint::Drives,
            ["network-interfaces"] | ["network-interfaces", _] => Endpoint::NetworkInterfaces,
            ["actions"] => Endpoint::Actions,
            ["logger"] => Endpoint::Logger,
            ["metrics"] => Endpoint::Metrics,
            ["vsock"] => Endpoint::Vsock,
            ["balloon"] | ["balloon", "statistics"] => Endpoint::Balloon,
            ["mmds"] | ["mmds", "config"] => Endpoint::Mmds,
            _ => Endpoint::Other,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::Root => "/",
            Endpoint::Version => "/version",
            Endpoint::VmConfig => "/vm/config",
            Endpoint::Vm => "/vm",
            Endpoint::MachineConfig => "/machine-config",
            Endpoint::BootSource => "/boot-source",
            Endpoint::Drives => "/drives/{id}",
            Endpoint::NetworkInterfaces => "/network-interfaces/{id}",
            Endpoint::Actions => "/actions",
            Endpoint::Logger => "/logger",
            Endpoint::Metrics => "/metrics",
            Endpoint::Vsock => "/vsock",
            Endpoint::Balloon => "/balloon",
            Endpoint::Mmds => "/mmds",
            Endpoint::Other => "other",
        }
    }
}

/// `PUT /actions` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ActionBody {
    action_type: ActionType,
}

#[derive(Debug, Deserialize)]
enum ActionType {
    InstanceStart,
    SendCtrlAltDel,
    FlushMetrics,
}

/// `PATCH /vm` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VmStateBody {
    state: VmStateRequest,
}

#[derive(Debug, Deserialize)]
enum VmStateRequest {
    Paused,
    Resumed,
}

/// Why a request cannot be served; the message is the `fault_message` (Firecracker's texts).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("Invalid request method and/or path: {0} {1}.")]
    InvalidPath(String, String),
    #[error("GET request cannot have a body.")]
    GetWithBody,
    #[error("Empty {0} request.")]
    EmptyBody(&'static str),
    #[error("{0} {1} is not supported by flick yet.")]
    NotYetSupported(String, String),
    #[error("{EMPTY_ID}")]
    EmptyId,
    #[error("{INVALID_ID}")]
    InvalidId,
    #[error("{ID_MISMATCH}")]
    IdMismatch,
    #[error("An error occurred when deserializing the json body of a request: {0}.")]
    Json(String),
    #[error("Unrecognized PUT request path `{0}`.")]
    UnrecognizedPut(String),
}

/// The action a request asks for, or why it cannot be served.
/// An empty `body` means the request had none.
pub fn route(method: &str, path: &str, body: &[u8]) -> Result<Action, RouteError> {
    let invalid = || RouteError::InvalidPath(method.into(), path.into());
    let segments = segments(path).ok_or_else(invalid)?;
    let found = match (method, body.is_empty()) {
        ("GET", true) => get(&segments).map(Ok),
        ("GET", false) => return Err(RouteError::GetWithBody),
        ("PUT", false) => put(&segments, body),
        ("PUT", true) => return Err(RouteError::EmptyBody("PUT")),
        ("PATCH", false) => patch(&segments, body),
        ("PATCH", true) => return Err(RouteError::EmptyBody("PATCH")),
        _ => None,
    };
    match found {
        Some(result) => result,
        None if firecracker_only(&segments) => {
            Err(RouteError::NotYetSupported(method.into(), path.into()))
        }
        None => Err(invalid()),
    }
}

/// Splits `/a/b/` into `["a", "b"]`; `/` gives `[""]`. `None` for a path without leading `/`.
fn segments(path: &str) -> Option<Vec<&str>> {
    let rest = path.strip_prefix('/')?;
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    Some(rest.split('/').collect())
}

fn get(segments: &[&str]) -> Option<Action> {
    let action = match segments {
        [""] => Action::GetInstanceInfo,
        ["version"] => Action::GetVersion,
        ["vm", "config"] => Action::GetVmConfig,
        ["machine-config"] => Action::GetMachineConfig,
        ["metrics"] => Action::GetMetrics,
        ["balloon"] => Action::GetBalloon,
        ["balloon", "statistics"] => Action::GetBalloonStats,
        ["mmds"] => Action::GetMmds,
        _ => return None,
    };
    Some(action)
}

fn put(segments: &[&str], body: &[u8]) -> Option<Result<Action, RouteError>> {
    let result = match segments {
        ["machine-config"] => parse::<MachineConfig>(body).map(Action::PutMachineConfig),
        ["boot-source"] => parse::<BootSourceConfig>(body).map(Action::PutBootSource),
        ["drives"] => Err(RouteError::EmptyId),
        ["drives", id] => with_id(id, body, |d: &DriveConfig| &d.drive_id).map(Action::PutDrive),
        ["network-interfaces"] => Err(RouteError::EmptyId),
        ["network-interfaces", id] => {
            with_id(id, body, |n: &NetConfig| &n.iface_id).map(Action::PutNetworkInterface)
        }
        ["actions"] => parse::<ActionBody>(body).map(|b| match b.action_type {
            ActionType::InstanceStart => Action::InstanceStart,
            ActionType::SendCtrlAltDel => Action::SendCtrlAltDel,
            ActionType::FlushMetrics => Action::FlushMetrics,
        }),
        ["logger"] => parse::<LoggerConfig>(body).map(Action::PutLogger),
        ["metrics"] => parse::<MetricsConfig>(body).map(Action::PutMetrics),
        ["vsock"] => parse::<VsockConfig>(body).map(Action::PutVsock),
        ["serial"] => parse::<SerialConfig>(body).map(Action::PutSerial),
        ["entropy"] => parse::<EntropyConfig>(body).map(Action::PutEntropy),
        ["balloon"] => parse::<BalloonConfig>(body).map(Action::PutBalloon),
        ["snapshot", "create"] => parse::<SnapshotCreateConfig>(body).map(Action::CreateSnapshot),
        ["snapshot", "load"] => parse::<SnapshotLoadConfig>(body).map(Action::LoadSnapshot),
        ["mmds"] => parse::<serde_json::Value>(body).map(Action::PutMmds),
        ["mmds", "config"] => parse::<MmdsConfig>(body).map(Action::PutMmdsConfig),
        ["mmds", other] => Err(RouteError::UnrecognizedPut(other.to_string())),
        _ => return None,
    };
    Some(result)
}

fn patch(segments: &[&str], body: &[u8]) -> Option<Result<Action, RouteError>> {
    let result = match segments {
        ["machine-config"] => parse::<MachineConfigUpdate>(body).map(Action::PatchMachineConfig),
        ["drives"] | ["network-interfaces"] => Err(RouteError::EmptyId),
        ["drives", id] => with_id(id, body, |d: &DriveUpdate| &d.drive_id).map(Action::PatchDrive),
        ["network-interfaces", id] => {
            with_id(id, body, |n: &NetUpdate| &n.iface_id).map(Action::PatchNetworkInterface)
        }
        ["vm"] => parse::<VmStateBody>(body).map(|b| match b.state {
            VmStateRequest::Paused => Action::Pause,
            VmStateRequest::Resumed => Action::Resume,
        }),
        ["balloon"] => parse::<BalloonUpdate>(body).map(Action::PatchBalloon),
        ["balloon", "statistics"] => {
            parse::<BalloonStatsUpdate>(body).map(Action::PatchBalloonStats)
        }
        ["mmds"] => parse::<serde_json::Value>(body).map(Action::PatchMmds),
        _ => return None,
    };
    Some(result)
}

/// Endpoints of Firecracker's API that flick does not serve yet.
fn firecracker_only(segments: &[&str]) -> bool {
    matches!(segments, ["cpu-config"] | ["pmem", ..] | ["hotplug", ..])
}

/// Checks the path id, parses the body and checks that the body names the same resource.
fn with_id<T: DeserializeOwned>(
    id: &str,
    body: &[u8],
    body_id: impl Fn(&T) -> &String,
) -> Result<T, RouteError> {
    check_id(id)?;
    let value: T = parse(body)?;
    if body_id(&value) != id {
        return Err(RouteError::IdMismatch);
    }
    Ok(value)
}

fn check_id(id: &str) -> Result<(), RouteError> {
    if id.is_empty() {
        return Err(RouteError::EmptyId);
    }
    validate_id(id).map_err(|_| RouteError::InvalidId)
}

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, RouteError> {
    serde_json::from_slice(body).map_err(|e| RouteError::Json(describe_json_error(&e)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HugePages;

    const DRIVE: &str = r#"{"drive_id": "rootfs", "path_on_host": "/r", "is_root_device": true, "is_read_only": false}"#;

    #[test]
    fn get_routes_map_to_their_actions() {
        for (path, action) in [
            ("/", Action::GetInstanceInfo),
            ("/version", Action::GetVersion),
            ("/vm/config", Action::GetVmConfig),
            ("/machine-config", Action::GetMachineConfig),
            ("/machine-config/", Action::GetMachineConfig),
            ("/metrics", Action::GetMetrics),
        ] {
            assert_eq!(route("GET", path, b""), Ok(action), "{path}");
        }
    }

    #[test]
    fn put_machine_config_parses_the_body() {
        let action = route(
            "PUT",
            "/machine-config",
            br#"{"vcpu_count": 2, "mem_size_mib": 256, "huge_pages": "2M"}"#,
        )
        .unwrap();
        let Action::PutMachineConfig(mc) = action else {
            panic!("{action:?}")
        };
        assert_eq!((mc.vcpu_count, mc.mem_size_mib), (2, 256));
        assert_eq!(mc.huge_pages, HugePages::Size2M);
    }

    #[test]
    fn patch_machine_config_takes_partial_bodies() {
        let action = route("PATCH", "/machine-config", br#"{"vcpu_count": 4}"#).unwrap();
        let Action::PatchMachineConfig(update) = action else {
            panic!("{action:?}")
        };
        assert_eq!(update.vcpu_count, Some(4));
        assert_eq!(update.mem_size_mib, None);
    }

    #[test]
    fn put_boot_source_parses_the_body() {
        let action = route(
            "PUT",
            "/boot-source",
            br#"{"kernel_image_path": "/k", "boot_args": "console=ttyS0"}"#,
        );
        assert!(matches!(action, Ok(Action::PutBootSource(b)) if b.kernel_image_path == "/k"));
    }

    #[test]
    fn put_drive_with_matching_id_is_accepted() {
        let action = route("PUT", "/drives/rootfs", DRIVE.as_bytes());
        assert!(matches!(action, Ok(Action::PutDrive(d)) if d.drive_id == "rootfs"));
    }

    #[test]
    fn patch_drive_with_matching_id_is_accepted() {
        let action = route(
            "PATCH",
            "/drives/rootfs",
            br#"{"drive_id": "rootfs", "path_on_host": "/new"}"#,
        );
        assert!(
            matches!(action, Ok(Action::PatchDrive(d)) if d.path_on_host.as_deref() == Some("/new"))
        );
    }

    #[test]
    fn network_interface_routes_parse_their_bodies() {
        let put = route(
            "PUT",
            "/network-interfaces/eth0",
            br#"{"iface_id": "eth0", "host_dev_name": "tap0"}"#,
        );
        let patch = route(
            "PATCH",
            "/network-interfaces/eth0",
            br#"{"iface_id": "eth0", "rx_rate_limiter": {"ops": {"size": 1, "refill_time": 10}}}"#,
        );
        assert!(matches!(put, Ok(Action::PutNetworkInterface(n)) if n.host_dev_name == "tap0"));
        assert!(
            matches!(patch, Ok(Action::PatchNetworkInterface(n)) if n.rx_rate_limiter.is_some())
        );
    }

    #[test]
    fn actions_map_to_their_action_types() {
        for (kind, action) in [
            ("InstanceStart", Action::InstanceStart),
            ("SendCtrlAltDel", Action::SendCtrlAltDel),
            ("FlushMetrics", Action::FlushMetrics),
        ] {
            let body = format!(r#"{{"action_type": "{kind}"}}"#);
            assert_eq!(route("PUT", "/actions", body.as_bytes()), Ok(action));
        }
    }

    #[test]
    fn patch_vm_maps_states_to_pause_and_resume() {
        assert_eq!(
            route("PATCH", "/vm", br#"{"state": "Paused"}"#),
            Ok(Action::Pause)
        );
        assert_eq!(
            route("PATCH", "/vm", br#"{"state": "Resumed"}"#),
            Ok(Action::Resume)
        );
    }

    #[test]
    fn logger_metrics_and_vsock_parse_their_bodies() {
        let logger = route(
            "PUT",
            "/logger",
            br#"{"level": "Debug", "show_level": true}"#,
        );
        let metrics = route("PUT", "/metrics", br#"{"metrics_path": "/m"}"#);
        let vsock = route("PUT", "/vsock", br#"{"guest_cid": 3, "uds_path": "/v"}"#);
        assert!(matches!(logger, Ok(Action::PutLogger(l)) if l.show_level));
        assert!(matches!(metrics, Ok(Action::PutMetrics(m)) if m.metrics_path == "/m"));
        assert!(matches!(vsock, Ok(Action::PutVsock(v)) if v.guest_cid == 3));
    }

    #[test]
    fn unknown_route_is_refused_with_method_and_path() {
        let err = route("GET", "/nope", b"").unwrap_err().to_string();
        assert_eq!(err, "Invalid request method and/or path: GET /nope.");
    }

    #[test]
    fn wrong_method_on_a_known_path_is_refused() {
        let put_root = route("PUT", "/", b"{}").unwrap_err().to_string();
        let delete = route("DELETE", "/machine-config", b"")
            .unwrap_err()
            .to_string();
        let patch_boot = route("PATCH", "/boot-source", b"{}")
            .unwrap_err()
            .to_string();
        assert_eq!(put_root, "Invalid request method and/or path: PUT /.");
        assert!(delete.starts_with("Invalid request method and/or path: DELETE"));
        assert!(patch_boot.starts_with("Invalid request method and/or path: PATCH"));
    }

    #[test]
    fn path_without_leading_slash_is_refused() {
        let err = route("GET", "none", b"").unwrap_err().to_string();
        assert!(err.starts_with("Invalid request method and/or path"));
    }

    #[test]
    fn extra_path_segments_are_refused() {
        let err = route("PUT", "/drives/a/b", DRIVE.as_bytes())
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("Invalid request method and/or path"));
    }

    #[test]
    fn get_with_body_is_refused() {
        assert_eq!(
            route("GET", "/", b"{}").unwrap_err().to_string(),
            "GET request cannot have a body."
        );
    }

    #[test]
    fn put_and_patch_without_body_are_refused() {
        assert_eq!(
            route("PUT", "/machine-config", b"")
                .unwrap_err()
                .to_string(),
            "Empty PUT request."
        );
        assert_eq!(
            route("PATCH", "/vm", b"").unwrap_err().to_string(),
            "Empty PATCH request."
        );
    }

    #[test]
    fn malformed_json_names_the_problem() {
        let err = route("PUT", "/machine-config", b"{\"vcpu_count\": 2,")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("An error occurred when deserializing the json body"));
        assert!(err.contains("EOF while parsing"), "{err}");
    }

    #[test]
    fn unknown_field_is_named() {
        let err = route(
            "PUT",
            "/machine-config",
            br#"{"vcpu_count": 1, "mem_size_mib": 128, "turbo": true}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("unknown field `turbo`"), "{err}");
    }

    #[test]
    fn missing_required_field_is_named() {
        let err = route("PUT", "/boot-source", br#"{"boot_args": "x"}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing field `kernel_image_path`"), "{err}");
    }

    #[test]
    fn unknown_action_type_is_refused() {
        let err = route("PUT", "/actions", br#"{"action_type": "Explode"}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown variant `Explode`"), "{err}");
    }

    #[test]
    fn empty_id_is_refused() {
        for (method, path) in [
            ("PUT", "/drives"),
            ("PUT", "/drives/"),
            ("PATCH", "/drives"),
            ("PUT", "/network-interfaces/"),
        ] {
            assert_eq!(
                route(method, path, DRIVE.as_bytes())
                    .unwrap_err()
                    .to_string(),
                EMPTY_ID,
                "{method} {path}"
            );
        }
    }

    #[test]
    fn invalid_id_is_refused() {
        let err = route("PUT", "/drives/root-fs", DRIVE.as_bytes())
            .unwrap_err()
            .to_string();
        assert_eq!(err, INVALID_ID);
    }

    #[test]
    fn path_id_different_from_body_id_is_refused() {
        let drive = route("PUT", "/drives/other", DRIVE.as_bytes())
            .unwrap_err()
            .to_string();
        let net = route(
            "PATCH",
            "/network-interfaces/eth1",
            br#"{"iface_id": "eth0"}"#,
        )
        .unwrap_err()
        .to_string();
        assert_eq!(drive, ID_MISMATCH);
        assert_eq!(net, ID_MISMATCH);
    }

    #[test]
    fn firecracker_endpoints_flick_lacks_say_so() {
        let err = route("PUT", "/cpu-config", b"{}").unwrap_err().to_string();
        assert_eq!(err, "PUT /cpu-config is not supported by flick yet.");
    }

    #[test]
    fn balloon_routes_parse_their_bodies() {
        let put = route(
            "PUT",
            "/balloon",
            br#"{"amount_mib": 8, "deflate_on_oom": false, "stats_polling_interval_s": 1}"#,
        );
        assert!(matches!(put, Ok(Action::PutBalloon(b)) if b.stats_polling_interval_s == 1));
        let patch = route("PATCH", "/balloon", br#"{"amount_mib": 4}"#);
        assert!(matches!(patch, Ok(Action::PatchBalloon(b)) if b.amount_mib == 4));
        let stats = route(
            "PATCH",
            "/balloon/statistics",
            br#"{"stats_polling_interval_s": 2}"#,
        );
        assert!(
            matches!(stats, Ok(Action::PatchBalloonStats(s)) if s.stats_polling_interval_s == 2)
        );
        assert_eq!(route("GET", "/balloon", b""), Ok(Action::GetBalloon));
        assert_eq!(
            route("GET", "/balloon/statistics", b""),
            Ok(Action::GetBalloonStats)
        );
        let negative = route("PATCH", "/balloon", br#"{"amount_mib": -1}"#)
            .unwrap_err()
            .to_string();
        assert!(negative.contains("invalid value"), "{negative}");
    }

    #[test]
    fn mmds_routes_carry_the_document_and_the_config() {
        let put = route("PUT", "/mmds", br#"{"latest": {"a": "b"}}"#);
        assert!(matches!(put, Ok(Action::PutMmds(v)) if v["latest"]["a"] == "b"));
        let patch = route("PATCH", "/mmds", br#"{"x": null}"#);
        assert!(matches!(patch, Ok(Action::PatchMmds(_))));
        assert_eq!(route("GET", "/mmds", b""), Ok(Action::GetMmds));
        let config = route(
            "PUT",
            "/mmds/config",
            br#"{"network_interfaces": ["eth0"], "version": "V2", "ipv4_address": "169.254.170.2"}"#,
        );
        assert!(matches!(config, Ok(Action::PutMmdsConfig(c)) if c.ipv4_address.is_some()));
        let bad_ip = route(
            "PUT",
            "/mmds/config",
            br#"{"network_interfaces": [], "ipv4_address": "1.2.3"}"#,
        );
        assert!(matches!(bad_ip, Err(RouteError::Json(_))));
        let other = route("PUT", "/mmds/other", b"{}").unwrap_err().to_string();
        assert_eq!(other, "Unrecognized PUT request path `other`.");
    }

    #[test]
    fn endpoints_fold_ids_for_metrics() {
        assert_eq!(Endpoint::of("/drives/rootfs"), Endpoint::Drives);
        assert_eq!(Endpoint::of("/vm/config"), Endpoint::VmConfig);
        assert_eq!(Endpoint::of("/"), Endpoint::Root);
        assert_eq!(Endpoint::of("/what/ever"), Endpoint::Other);
        assert_eq!(Endpoint::of("x"), Endpoint::Other);
    }
}
