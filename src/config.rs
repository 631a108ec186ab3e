//! User-facing configuration: the serde types that the config file and the HTTP API accept, and
//! their validation.
//!
//! Shapes and field names follow Firecracker's API so that existing scripts and orchestrators work
//! unchanged. This module does no I/O: checks that need the host (files exist, KVM limits) happen
//! in the VMM builder. It may be used from any thread and imports nothing else from the crate.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Largest number of vCPUs a guest may have.
pub const MAX_VCPUS: u8 = 32;
/// Default guest memory when `machine-config` is absent.
pub const DEFAULT_MEM_SIZE_MIB: usize = 128;
/// Largest number of block devices per VM.
pub const MAX_DRIVES: usize = 16;
/// Kernel command line used when `boot_args` is absent (Firecracker's default).
pub const DEFAULT_BOOT_ARGS: &str = "reboot=k panic=1 nomodule 8250.nr_uarts=0 i8042.noaux \
                                     i8042.nomux i8042.dumbkbd swiotlb=noforce pci=off";

/// A configuration value that cannot be accepted.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("invalid vcpu_count {0}: must be between 1 and {MAX_VCPUS}")]
    VcpuCount(u8),
    #[error("invalid vcpu_count {0}: must be 1 or even when smt is enabled")]
    VcpuCountSmt(u8),
    #[error("invalid mem_size_mib 0: guest memory must not be empty")]
    MemSizeZero,
    #[error("invalid mem_size_mib {0}: must be a multiple of 2 when huge_pages is 2M")]
    MemSizeHugePages(usize),
    #[error("invalid id \"{0}\": must be non-empty and contain only alphanumerics and '_'")]
    Id(String),
    #[error("invalid kernel_image_path: must not be empty")]
    KernelPath,
    #[error("too many drives: at most {MAX_DRIVES} are supported")]
    TooManyDrives,
    #[error("only one drive can be the root device")]
    TwoRootDrives,
    #[error("invalid path_on_host for drive \"{0}\": must not be empty")]
    DrivePath(String),
    #[error("invalid guest_mac \"{0}\": expected six hex octets like 06:00:ac:10:00:02")]
    Mac(String),
    #[error("invalid host_dev_name \"{0}\": must be 1 to 15 bytes without '/' or whitespace")]
    TapName(String),
    #[error("{0} is not supported by flick yet")]
    NotSupported(&'static str),
    #[error("invalid guest_cid {0}: must be at least 3 and below 4294967295")]
    GuestCid(u32),
    #[error("invalid uds_path \"{0}\": must be 1 to {MAX_UDS_PATH} bytes")]
    UdsPath(String),
    #[error("give either mem_backend or mem_file_path, not both")]
    TwoMemBackends,
    #[error("missing mem_backend")]
    NoMemBackend,
    #[error("invalid cpu_template \"{0}\": only \"None\" is supported (see cpu_profile)")]
    CpuTemplate(String),
    #[error("invalid amount_mib {amount_mib}: the balloon cannot be larger than guest memory ({mem_size_mib} MiB)")]
    BalloonTooLarge {
        amount_mib: u32,
        mem_size_mib: usize,
    },
    #[error("MMDS config error: The list of network interface IDs that allow forwarding MMDS requests is empty.")]
    MmdsNoInterfaces,
    #[error("MMDS config error: The MMDS IPv4 address is not link local.")]
    MmdsAddress,
    #[error("MMDS config error: The list of network interface IDs provided contains at least one ID that does not correspond to any existing network interface.")]
    MmdsUnknownInterface,
}

/// Checks a Firecracker-style resource id: non-empty, alphanumerics and `_` only.
pub fn validate_id(id: &str) -> Result<(), ConfigError> {
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(ConfigError::Id(id.to_string()));
    }
    Ok(())
}

/// Huge page backing for guest memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum HugePages {
    #[default]
    None,
    /// hugetlbfs 2 MiB pages (refused: not implemented).
    #[serde(rename = "2M")]
    Size2M,
    /// Transparent huge pages: guest RAM is marked `MADV_HUGEPAGE`.
    Transparent,
}

/// Which CPU features the guest is offered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CpuProfile {
    /// `conservative` on a host whose KVM emulates guest kernel code (PVM), `host` elsewhere.
    #[default]
    Auto,
    /// What KVM supports on this host, normalised for the guest's topology.
    Host,
    /// `host` minus features that KVM's instruction emulator cannot run (XSAVE family, CX16,
    /// SMAP/SMEP, POPCNT, AVX, ...).
    Conservative,
}

/// `machine-config`: vCPUs, memory and CPU model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    pub vcpu_count: u8,
    pub mem_size_mib: usize,
    #[serde(default)]
    pub smt: bool,
    #[serde(default)]
    pub track_dirty_pages: bool,
    #[serde(default)]
    pub huge_pages: HugePages,
    /// Accepted for Firecracker compatibility; only `"None"` is meaningful.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<String>,
    #[serde(default)]
    pub cpu_profile: CpuProfile,
}

impl Default for MachineConfig {
    fn default() -> Self {
        MachineConfig {
            vcpu_count: 1,
            mem_size_mib: DEFAULT_MEM_SIZE_MIB,
            smt: false,
            track_dirty_pages: false,
            huge_pages: HugePages::None,
            cpu_template: None,
            cpu_profile: CpuProfile::Auto,
        }
    }
}

impl MachineConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.vcpu_count == 0 || self.vcpu_count > MAX_VCPUS {
            return Err(ConfigError::VcpuCount(self.vcpu_count));
        }
        if self.smt && self.vcpu_count > 1 && !self.vcpu_count.is_multiple_of(2) {
            return Err(ConfigError::VcpuCountSmt(self.vcpu_count));
        }
        if self.mem_size_mib == 0 {
            return Err(ConfigError::MemSizeZero);
        }
        if self.huge_pages == HugePages::Size2M {
            if !self.mem_size_mib.is_multiple_of(2) {
                return Err(ConfigError::MemSizeHugePages(self.mem_size_mib));
            }
            return Err(ConfigError::NotSupported(
                "huge_pages 2M (hugetlbfs); use Transparent or None",
            ));
        }
        match self.cpu_template.as_deref() {
            None | Some("None") => Ok(()),
            Some(other) => Err(ConfigError::CpuTemplate(other.to_string())),
        }
    }
}

/// `machine-config` PATCH body: every field optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigUpdate {
    pub vcpu_count: Option<u8>,
    pub mem_size_mib: Option<usize>,
    pub smt: Option<bool>,
    pub track_dirty_pages: Option<bool>,
    pub huge_pages: Option<HugePages>,
    pub cpu_template: Option<String>,
    pub cpu_profile: Option<CpuProfile>,
}

impl MachineConfigUpdate {
    /// Applies the present fields on top of `base`.
    pub fn apply(&self, base: &MachineConfig) -> MachineConfig {
        MachineConfig {
            vcpu_count: self.vcpu_count.unwrap_or(base.vcpu_count),
            mem_size_mib: self.mem_size_mib.unwrap_or(base.mem_size_mib),
            smt: self.smt.unwrap_or(base.smt),
            track_dirty_pages: self.track_dirty_pages.unwrap_or(base.track_dirty_pages),
            huge_pages: self.huge_pages.unwrap_or(base.huge_pages),
            cpu_template: self.cpu_template.clone().or(base.cpu_template.clone()),
            cpu_profile: self.cpu_profile.unwrap_or(base.cpu_profile),
        }
    }
}

/// `boot-source`: the guest kernel, its command line and an optional initrd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSourceConfig {
    pub kernel_image_path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
}

impl BootSourceConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.kernel_image_path.is_empty() {
            return Err(ConfigError::KernelPath);
        }
        Ok(())
    }
}

/// A token bucket of a rate limiter: `size` tokens, refilled every `refill_time` ms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBucketConfig {
    pub size: u64,
    pub refill_time: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_time_burst: Option<u64>,
}

/// Rate limiter of a drive or network interface.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimiterConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucketConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucketConfig>,
}

/// Host page cache behaviour of a drive.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheType {
    #[default]
    Unsafe,
    Writeback,
}

/// How a drive performs I/O on the host.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum IoEngine {
    #[default]
    Sync,
    Async,
}

/// `drives/{drive_id}`: a virtio-blk device backed by a host file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveConfig {
    pub drive_id: String,
    pub path_on_host: String,
    pub is_root_device: bool,
    #[serde(default)]
    pub is_read_only: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    #[serde(default)]
    pub cache_type: CacheType,
    #[serde(default)]
    pub io_engine: IoEngine,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiterConfig>,
}

impl DriveConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_id(&self.drive_id)?;
        if self.path_on_host.is_empty() {
            return Err(ConfigError::DrivePath(self.drive_id.clone()));
        }
        if self.io_engine == IoEngine::Async {
            return Err(ConfigError::NotSupported(
                "io_engine Async (drives do synchronous I/O; use Sync)",
            ));
        }
        Ok(())
    }
}

/// `network-interfaces/{iface_id}`: a virtio-net device backed by a host TAP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    pub iface_id: String,
    pub host_dev_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiterConfig>,
}

/// Checks a TAP device name: 1 to 15 bytes, no `/` or whitespace.
pub fn validate_tap_name(name: &str) -> Result<(), ConfigError> {
    if name.is_empty()
        || name.len() > 15
        || name.contains('/')
        || name.chars().any(char::is_whitespace)
    {
        return Err(ConfigError::TapName(name.to_string()));
    }
    Ok(())
}

impl NetConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_id(&self.iface_id)?;
        validate_tap_name(&self.host_dev_name)?;
        if let Some(mac) = &self.guest_mac {
            parse_mac(mac)?;
        }
        Ok(())
    }
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(text: &str) -> Result<[u8; 6], ConfigError> {
    let bad = || ConfigError::Mac(text.to_string());
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in mac.iter_mut() {
        let part = parts.next().ok_or_else(bad)?;
        // Two hex digits exactly: from_str_radix alone would also take a sign ("+2").
        if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    Ok(mac)
}

/// Log verbosity, Firecracker's names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum LogLevel {
    Off,
    Error,
    #[serde(alias = "Warn")]
    Warning,
    #[default]
    Info,
    Debug,
    Trace,
}

impl std::str::FromStr for LogLevel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "off" => Ok(LogLevel::Off),
            "error" => Ok(LogLevel::Error),
            "warn" | "warning" => Ok(LogLevel::Warning),
            "info" => Ok(LogLevel::Info),
            "debug" => Ok(LogLevel::Debug),
            "trace" => Ok(LogLevel::Trace),
            _ => Err(format!(
                "invalid log level \"{s}\": expected Off, Error, Warning, Info, Debug or Trace"
            )),
        }
    }
}

/// `logger`: where and how much to log.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoggerConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<LogLevel>,
    #[serde(default)]
    pub show_level: bool,
    #[serde(default)]
    pub show_log_origin: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

/// `metrics`: where to write JSON-lines metrics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    pub metrics_path: String,
    /// Write the instance id as a top-level `id` field on every line.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub emit_id: bool,
    /// Key-value pairs (string values) written under a top-level `properties` field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub properties: Option<std::collections::BTreeMap<String, String>>,
}

/// Longest `uds_path`: a unix socket address holds 107 bytes, and guest-initiated connections
/// append `_<port>` (up to 11 bytes).
pub const MAX_UDS_PATH: usize = 96;

/// `vsock`: a virtio-vsock device whose host side is the unix socket `uds_path`.
/// `vsock_id` is Firecracker's deprecated device id, kept only to be shown back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_id: Option<String>,
    pub guest_cid: u32,
    pub uds_path: String,
}

impl VsockConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(id) = &self.vsock_id {
            validate_id(id)?;
        }
        // 0-2 are reserved (hypervisor, local, host); u32::MAX means "any".
        if self.guest_cid < 3 || self.guest_cid == u32::MAX {
            return Err(ConfigError::GuestCid(self.guest_cid));
        }
        validate_uds_path(&self.uds_path)
    }
}

/// Checks a vsock `uds_path` fits a unix socket address with its port suffix.
pub fn validate_uds_path(path: &str) -> Result<(), ConfigError> {
    if path.is_empty() || path.len() > MAX_UDS_PATH || path.contains('\0') {
        return Err(ConfigError::UdsPath(path.to_string()));
    }
    Ok(())
}

/// `vsock_override` of `PUT /snapshot/load`: the restored vsock device listens on another path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockOverride {
    pub uds_path: String,
}

/// Kind of snapshot to create.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotType {
    #[default]
    Full,
    Diff,
}

/// `PUT /snapshot/create` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreateConfig {
    pub snapshot_path: String,
    pub mem_file_path: String,
    #[serde(default)]
    pub snapshot_type: SnapshotType,
}

/// Where a snapshot's memory comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemBackendType {
    File,
    Uffd,
}

/// `mem_backend` of `PUT /snapshot/load`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemBackendConfig {
    pub backend_type: MemBackendType,
    pub backend_path: String,
}

/// One entry of `network_overrides`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkOverride {
    pub iface_id: String,
    pub host_dev_name: String,
}

/// `PUT /snapshot/load` body. `mem_file_path` is Firecracker's older spelling of a File backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotLoadConfig {
    pub snapshot_path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_backend: Option<MemBackendConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_file_path: Option<String>,
    #[serde(default)]
    pub enable_diff_snapshots: bool,
    #[serde(default)]
    pub track_dirty_pages: bool,
    #[serde(default)]
    pub resume_vm: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub network_overrides: Vec<NetworkOverride>,
    /// Advance the guest's KVM clock by the wall-clock time since the snapshot (refused: flick
    /// restores the clock where it stopped).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub clock_realtime: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_override: Option<VsockOverride>,
}

/// Where a snapshot load takes guest memory from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemSource<'a> {
    /// The memory file, mapped privately.
    File(&'a str),
    /// A page server listening on this unix socket (Firecracker's UFFD protocol).
    Uffd(&'a str),
}

impl SnapshotLoadConfig {
    /// Whether the restored VM tracks dirty pages (either spelling), so that diff snapshots
    /// can be taken of it.
    pub fn track_dirty(&self) -> bool {
        self.enable_diff_snapshots || self.track_dirty_pages
    }

    /// Where guest memory comes from: the memory file to map (either spelling), or the unix
    /// socket of a UFFD page server.
    pub fn mem_source(&self) -> Result<MemSource<'_>, ConfigError> {
        if self.clock_realtime {
            return Err(ConfigError::NotSupported(
                "clock_realtime (the KVM clock resumes where the snapshot stopped it)",
            ));
        }
        match (&self.mem_backend, &self.mem_file_path) {
            (Some(b), None) if b.backend_type == MemBackendType::File => {
                Ok(MemSource::File(&b.backend_path))
            }
            (Some(b), None) => Ok(MemSource::Uffd(&b.backend_path)),
            (None, Some(path)) => Ok(MemSource::File(path)),
            (Some(_), Some(_)) => Err(ConfigError::TwoMemBackends),
            (None, None) => Err(ConfigError::NoMemBackend),
        }
    }
}

/// `serial`: where the guest's console output goes (stdout when absent).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial_out_path: Option<String>,
    /// Bytes per refill period the guest may write to the console; the rest is dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<TokenBucketConfig>,
}

/// How the guest talks to MMDS: V1 (plain requests, tokens optional) or V2 (session tokens).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum MmdsVersion {
    #[default]
    V1,
    V2,
}

/// The guest's MMDS address when `ipv4_address` is absent.
pub const DEFAULT_MMDS_IPV4: std::net::Ipv4Addr = std::net::Ipv4Addr::new(169, 254, 169, 254);

/// `mmds-config` (`PUT /mmds/config`): which interfaces answer MMDS requests, at which address,
/// in which version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MmdsConfig {
    #[serde(default)]
    pub version: MmdsVersion,
    pub network_interfaces: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4_address: Option<std::net::Ipv4Addr>,
    #[serde(default)]
    pub imds_compat: bool,
}

impl MmdsConfig {
    /// The address the guest reaches MMDS at.
    pub fn ipv4(&self) -> std::net::Ipv4Addr {
        self.ipv4_address.unwrap_or(DEFAULT_MMDS_IPV4)
    }

    /// Checks the address and that every interface id is one of `interfaces`.
    pub fn validate(&self, interfaces: &[NetConfig]) -> Result<(), ConfigError> {
        if !is_link_local(self.ipv4()) {
            return Err(ConfigError::MmdsAddress);
        }
        if self.network_interfaces.is_empty() {
            return Err(ConfigError::MmdsNoInterfaces);
        }
        let known = |id: &String| interfaces.iter().any(|n| &n.iface_id == id);
        if !self.network_interfaces.iter().all(known) {
            return Err(ConfigError::MmdsUnknownInterface);
        }
        Ok(())
    }
}

/// Whether `ip` is in 169.254.0.0/16 outside its first and last /24 (reserved by RFC 3927).
pub fn is_link_local(ip: std::net::Ipv4Addr) -> bool {
    matches!(ip.octets(), [169, 254, third, _] if third != 0 && third != 255)
}

/// The whole VM configuration: the config file's shape and `GET /vm/config`'s answer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct VmConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_source: Option<BootSourceConfig>,
    #[serde(default)]
    pub machine_config: MachineConfig,
    #[serde(default)]
    pub drives: Vec<DriveConfig>,
    #[serde(default)]
    pub network_interfaces: Vec<NetConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logger: Option<LoggerConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<MetricsConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<SerialConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<BalloonConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entropy: Option<EntropyConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mmds_config: Option<MmdsConfig>,
}

/// `entropy`: a virtio-rng device fed from the host's `getrandom`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntropyConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiterConfig>,
}

/// `balloon`: a virtio-balloon device. `amount_mib` is the target the guest's driver inflates
/// to; statistics are polled every `stats_polling_interval_s` seconds (0: off).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonConfig {
    pub amount_mib: u32,
    pub deflate_on_oom: bool,
    #[serde(default)]
    pub stats_polling_interval_s: u16,
}

/// Checks a balloon target against guest memory.
pub fn validate_balloon_amount(amount_mib: u32, mem_size_mib: usize) -> Result<(), ConfigError> {
    if usize::try_from(amount_mib).map_or(true, |a| a > mem_size_mib) {
        return Err(ConfigError::BalloonTooLarge {
            amount_mib,
            mem_size_mib,
        });
    }
    Ok(())
}

/// `PATCH /balloon` body: a new target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonUpdate {
    pub amount_mib: u32,
}

/// `PATCH /balloon/statistics` body: a new polling interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonStatsUpdate {
    pub stats_polling_interval_s: u16,
}

/// A config file that cannot be parsed.
#[derive(Debug, Error)]
#[error("{0}")]
pub struct ParseError(String);

impl VmConfig {
    /// Parses a config file's JSON text. Unknown keys and fields are rejected by name.
    pub fn from_json(text: &str) -> Result<VmConfig, ParseError> {
        serde_json::from_str(text).map_err(|e| ParseError(describe_json_error(&e)))
    }
}

/// Renders a serde_json error as one line: what is wrong and where.
pub fn describe_json_error(err: &serde_json::Error) -> String {
    let msg = err.to_string();
    // serde_json appends " at line L column C"; keep it, it points at the offending spot.
    msg.replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_implemented_memory_options_are_accepted() {
        let with = |extra: &str| {
            let text = format!(r#"{{"vcpu_count": 1, "mem_size_mib": 128{extra}}}"#);
            serde_json::from_str::<MachineConfig>(&text)
                .unwrap()
                .validate()
        };
        assert_eq!(with(r#", "huge_pages": "Transparent""#), Ok(()));
        assert_eq!(with(r#", "huge_pages": "None""#), Ok(()));
        let refused = with(r#", "huge_pages": "2M""#).unwrap_err().to_string();
        assert!(refused.contains("not supported"), "{refused}");
        assert_eq!(with(r#", "track_dirty_pages": true"#), Ok(()));
    }

    #[test]
    fn balloon_takes_firecracker_fields_and_checks_its_amount() {
        let cfg = VmConfig::from_json(r#"{"balloon": {"amount_mib": 16, "deflate_on_oom": true}}"#)
            .unwrap();
        let balloon = cfg.balloon.unwrap();
        assert_eq!(balloon.stats_polling_interval_s, 0);
        assert!(validate_balloon_amount(128, 128).is_ok());
        let refused = validate_balloon_amount(129, 128).unwrap_err().to_string();
        assert!(refused.contains("larger than guest memory"), "{refused}");
        let missing = VmConfig::from_json(r#"{"balloon": {"amount_mib": 1}}"#).unwrap_err();
        assert!(missing.to_string().contains("deflate_on_oom"), "{missing}");
    }

    #[test]
    fn is_read_only_defaults_to_false() {
        let drive: DriveConfig = serde_json::from_str(
            r#"{"drive_id": "d", "path_on_host": "/d", "is_root_device": false}"#,
        )
        .unwrap();
        assert!(!drive.is_read_only);
    }

    #[test]
    fn config_file_with_firecracker_shape_parses() {
        let text = r#"{
            "boot-source": {"kernel_image_path": "/k", "boot_args": "console=ttyS0"},
            "drives": [{"drive_id": "rootfs", "path_on_host": "/r", "is_root_device": true,
                        "is_read_only": false}],
            "machine-config": {"vcpu_count": 2, "mem_size_mib": 256, "smt": false},
            "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0",
                                    "guest_mac": "06:00:ac:10:00:02"}],
            "logger": {"level": "Info", "log_path": "/tmp/log"}
        }"#;
        let cfg = VmConfig::from_json(text).unwrap();
        assert_eq!(cfg.machine_config.vcpu_count, 2);
        assert_eq!(cfg.drives[0].drive_id, "rootfs");
        assert_eq!(cfg.network_interfaces[0].host_dev_name, "tap0");
    }

    #[test]
    fn unknown_top_level_key_is_rejected_by_name() {
        let err = VmConfig::from_json(r#"{"boot-sauce": {}}"#).unwrap_err();
        assert!(err.to_string().contains("boot-sauce"), "{err}");
    }

    #[test]
    fn unknown_nested_field_is_rejected_by_name() {
        let err = VmConfig::from_json(
            r#"{"machine-config": {"vcpu_count": 1, "mem_size_mib": 64, "turbo": true}}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("turbo"), "{err}");
    }

    #[test]
    fn missing_machine_config_uses_defaults() {
        let cfg = VmConfig::from_json(r#"{"boot-source": {"kernel_image_path": "/k"}}"#).unwrap();
        assert_eq!(cfg.machine_config, MachineConfig::default());
    }

    #[test]
    fn vcpu_count_zero_and_33_are_rejected() {
        for n in [0, 33] {
            let cfg = MachineConfig {
                vcpu_count: n,
                ..Default::default()
            };
            assert_eq!(cfg.validate(), Err(ConfigError::VcpuCount(n)));
        }
    }

    #[test]
    fn vcpu_count_32_is_accepted() {
        let cfg = MachineConfig {
            vcpu_count: 32,
            ..Default::default()
        };
        assert_eq!(cfg.validate(), Ok(()));
    }

    #[test]
    fn memory_zero_is_rejected() {
        let cfg = MachineConfig {
            mem_size_mib: 0,
            ..Default::default()
        };
        assert_eq!(cfg.validate(), Err(ConfigError::MemSizeZero));
    }

    #[test]
    fn ids_allow_only_alphanumerics_and_underscore() {
        assert!(validate_id("root_fs1").is_ok());
        assert!(validate_id("").is_err());
        assert!(validate_id("a-b").is_err());
        assert!(validate_id("a b").is_err());
    }

    #[test]
    fn mac_parsing_accepts_six_octets_only() {
        assert_eq!(
            parse_mac("06:00:AC:10:00:02").unwrap(),
            [6, 0, 0xac, 0x10, 0, 2]
        );
        assert!(parse_mac("06:00:ac:10:00").is_err());
        assert!(parse_mac("06:00:ac:10:00:02:03").is_err());
        assert!(parse_mac("06:00:ac:10:00:zz").is_err());
        assert!(parse_mac("6:00:ac:10:00:02").is_err());
        // A sign is no hex digit (found by the config_file fuzz target).
        assert!(parse_mac("06:00:AC:10:00:+2").is_err());
        assert!(parse_mac("06:00:AC:10:00:-2").is_err());
    }

    #[test]
    fn machine_config_patch_keeps_absent_fields() {
        let base = MachineConfig {
            vcpu_count: 2,
            mem_size_mib: 512,
            ..Default::default()
        };
        let patch = MachineConfigUpdate {
            mem_size_mib: Some(64),
            ..Default::default()
        };
        let merged = patch.apply(&base);
        assert_eq!((merged.vcpu_count, merged.mem_size_mib), (2, 64));
    }

    fn nic(id: &str) -> NetConfig {
        NetConfig {
            iface_id: id.into(),
            host_dev_name: "tap0".into(),
            guest_mac: None,
            mtu: None,
            rx_rate_limiter: None,
            tx_rate_limiter: None,
        }
    }

    #[test]
    fn mmds_config_defaults_to_v1_at_169_254_169_254() {
        let cfg: MmdsConfig = serde_json::from_str(r#"{"network_interfaces": ["eth0"]}"#).unwrap();
        assert_eq!(cfg.version, MmdsVersion::V1);
        assert_eq!(cfg.ipv4(), DEFAULT_MMDS_IPV4);
        assert!(!cfg.imds_compat);
        assert_eq!(cfg.validate(&[nic("eth0")]), Ok(()));
    }

    #[test]
    fn mmds_config_refuses_unknown_interfaces_and_non_link_local_addresses() {
        let with = |ifaces: &[&str], ip: &str| MmdsConfig {
            version: MmdsVersion::V2,
            network_interfaces: ifaces.iter().map(|s| s.to_string()).collect(),
            ipv4_address: Some(ip.parse().unwrap()),
            imds_compat: false,
        };
        let nics = [nic("eth0")];
        assert_eq!(with(&["eth0"], "169.254.170.2").validate(&nics), Ok(()));
        let unknown = with(&["eth1"], "169.254.170.2").validate(&nics);
        assert_eq!(unknown, Err(ConfigError::MmdsUnknownInterface));
        let empty = with(&[], "169.254.170.2").validate(&nics);
        assert_eq!(empty, Err(ConfigError::MmdsNoInterfaces));
        for ip in ["10.0.0.1", "169.254.0.3", "169.254.255.1"] {
            let bad = with(&["eth0"], ip).validate(&nics);
            assert_eq!(bad, Err(ConfigError::MmdsAddress), "{ip}");
        }
    }

    #[test]
    fn vsock_needs_a_guest_cid_of_3_or_more_and_a_short_uds_path() {
        let vsock = |guest_cid, uds_path: &str| VsockConfig {
            vsock_id: None,
            guest_cid,
            uds_path: uds_path.into(),
        };
        assert_eq!(vsock(3, "/tmp/v.sock").validate(), Ok(()));
        for cid in [0, 1, 2, u32::MAX] {
            assert_eq!(vsock(cid, "/v").validate(), Err(ConfigError::GuestCid(cid)));
        }
        assert!(matches!(
            vsock(3, "").validate(),
            Err(ConfigError::UdsPath(_))
        ));
        let long = "a".repeat(MAX_UDS_PATH + 1);
        assert!(matches!(
            vsock(3, &long).validate(),
            Err(ConfigError::UdsPath(_))
        ));
        let bad_id = VsockConfig {
            vsock_id: Some("a-b".into()),
            ..vsock(3, "/v")
        };
        assert!(matches!(bad_id.validate(), Err(ConfigError::Id(_))));
    }

    #[test]
    fn unsupported_cpu_template_is_rejected() {
        let cfg = MachineConfig {
            cpu_template: Some("T2".into()),
            ..Default::default()
        };
        assert!(matches!(cfg.validate(), Err(ConfigError::CpuTemplate(_))));
    }
}
