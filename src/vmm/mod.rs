//! The VMM thread: owns the VM's lifecycle and every device's state, answers [`Action`]s, and runs
//! the event loop (event-manager) that watches the API wake-up, guest reset, vCPU stops and the
//! console input.
//!
//! Lifecycle: `NotStarted → Running ⇄ Paused → Exited`. An action in the wrong state is refused
//! with an error reply, never a panic. Imports `config`, `control`, `devices`, `kvm`, `arch`,
//! `boot`; nothing imports this module except `main`.

pub mod attach;
pub mod builder;
mod event_loop;
pub mod metrics;
pub mod snapshot;

use std::sync::Arc;
use std::time::Instant;

use crate::config::{self, VmConfig};
use crate::control::{Action, ControlReceiver, Reply};
use crate::devices::boot_timer::{process_cpu_us, BootTimes};
use crate::devices::bus::lock;
use crate::devices::legacy::SerialOut;
use crate::kvm::vcpu::VcpuCommand;
use crate::kvm::HostKind;
use builder::{BuildContext, RunningVm};

/// The VMM's version, reported by `GET /` and `GET /version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Exit code when the guest stopped on an error (emulation failure, triple fault, ...).
pub const EXIT_GUEST_FAULT: i32 = 3;

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

/// How the process should end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitStatus {
    pub code: i32,
    /// Printed on stderr when present.
    pub message: Option<String>,
}

/// Process-level settings that are not part of the VM configuration.
pub struct VmmOptions {
    pub instance_id: String,
    pub boot_timer: bool,
    pub serial_out: Option<SerialOut>,
    /// Feed this process's stdin to the guest's serial port.
    pub serial_in: bool,
}

/// The VMM: configuration, lifecycle and (once started) the running VM.
pub struct Vmm {
    options: VmmOptions,
    config: VmConfig,
    state: VmState,
    host: HostKind,
    running: Option<RunningVm>,
    control: Option<ControlReceiver>,
    exit: Option<ExitStatus>,
    boot_times: Arc<BootTimes>,
    /// Fds already registered with the event loop.
    watching_vm: bool,
    /// Writes a metrics line to `metrics_path` periodically while the VM runs.
    metrics_timer: Option<vmm_sys_util::timerfd::TimerFd>,
    stdin_open: bool,
    pending_input: Vec<u8>,
}

pub(crate) const STDIN_FD: i32 = 0;
/// How often metrics are appended to `metrics_path` (Firecracker's period).
pub(crate) const METRICS_PERIOD: std::time::Duration = std::time::Duration::from_secs(60);
pub(crate) const MAX_PENDING_INPUT: usize = 4096;

fn json<T: serde::Serialize>(value: &T) -> Reply {
    match serde_json::to_string(value) {
        Ok(text) => Reply::Json(text),
        Err(e) => Reply::Error(format!("cannot encode the reply: {e}")),
    }
}

impl Vmm {
    pub fn new(options: VmmOptions, control: Option<ControlReceiver>) -> Vmm {
        let host = HostKind::detect();
        Vmm {
            stdin_open: options.serial_in,
            options,
            config: VmConfig::default(),
            state: VmState::NotStarted,
            host,
            running: None,
            control,
            exit: None,
            boot_times: Arc::new(BootTimes::default()),
            watching_vm: false,
            metrics_timer: None,
            pending_input: Vec::new(),
        }
    }

    pub fn state(&self) -> VmState {
        self.state
    }

    pub fn host(&self) -> HostKind {
        self.host
    }

    /// Device subscribers created since the last call, for the main loop to register.
    pub fn take_new_subscribers(&mut self) -> Vec<crate::devices::virtio::VirtioSlot> {
        match &mut self.running {
            Some(vm) => std::mem::take(&mut vm.devices.slots),
            None => Vec::new(),
        }
    }

    /// Stops the vCPUs from running guest code (without waiting), before the process exits.
    pub fn park_vcpus(&self) {
        if let Some(vm) = &self.running {
            for vcpu in &vm.vcpus.handles {
                vcpu.park();
            }
        }
    }

    /// Set once the VMM should end; the main loop stops then.
    pub fn exit_status(&self) -> Option<&ExitStatus> {
        self.exit.as_ref()
    }

    fn require_not_started(&self, what: &str) -> Result<(), String> {
        if self.state != VmState::NotStarted {
            return Err(format!("{what} is only allowed before the VM starts"));
        }
        Ok(())
    }

    fn require_started(&self, what: &str) -> Result<(), String> {
        if self.state == VmState::NotStarted {
            return Err(format!("{what} is only allowed after the VM starts"));
        }
        Ok(())
    }

    /// Answers one action. The same entry point serves the API, the config file and the CLI.
    pub fn handle(&mut self, action: Action) -> Reply {
        tracing::debug!("action: {action:?}");
        match self.dispatch(action) {
            Ok(reply) => reply,
            Err(message) => {
                tracing::debug!("action refused: {message}");
                Reply::Error(message)
            }
        }
    }

    fn dispatch(&mut self, action: Action) -> Result<Reply, String> {
        let err = |e: config::ConfigError| e.to_string();
        match action {
            Action::GetInstanceInfo => Ok(json(&serde_json::json!({
                "id": self.options.instance_id,
                "state": self.state.as_str(),
                "vmm_version": VERSION,
                "app_name": "flick",
            }))),
            Action::GetVersion => Ok(json(&serde_json::json!({ "firecracker_version": VERSION }))),
            Action::GetVmConfig => Ok(json(&self.config)),
            Action::GetMachineConfig => Ok(json(&self.config.machine_config)),
            Action::PutMachineConfig(mc) => {
                self.require_not_started("PUT /machine-config")?;
                mc.validate().map_err(err)?;
                self.config.machine_config = mc;
                Ok(Reply::Empty)
            }
            Action::PatchMachineConfig(update) => {
                self.require_not_started("PATCH /machine-config")?;
                let mc = update.apply(&self.config.machine_config);
                mc.validate().map_err(err)?;
                self.config.machine_config = mc;
                Ok(Reply::Empty)
            }
            Action::PutBootSource(boot) => {
                self.require_not_started("PUT /boot-source")?;
                boot.validate().map_err(err)?;
                self.config.boot_source = Some(boot);
                Ok(Reply::Empty)
            }
            Action::PutDrive(drive) => {
                self.require_not_started("PUT /drives")?;
                drive.validate().map_err(err)?;
                // Check the backing file now so a bad path fails this request, not the boot.
                crate::devices::virtio::block::Backing::open(
                    &drive.path_on_host,
                    drive.is_read_only,
                )
                .map_err(|e| format!("drive {}: {}", drive.drive_id, crate::error_chain(&e)))?;
                let drives = &mut self.config.drives;
                let others = drives.iter().filter(|d| d.drive_id != drive.drive_id);
                if drive.is_root_device && others.clone().any(|d| d.is_root_device) {
                    return Err(config::ConfigError::TwoRootDrives.to_string());
                }
                if let Some(existing) = drives.iter_mut().find(|d| d.drive_id == drive.drive_id) {
                    *existing = drive;
                } else if drives.len() >= config::MAX_DRIVES {
                    return Err(config::ConfigError::TooManyDrives.to_string());
                } else {
                    drives.push(drive);
                }
                Ok(Reply::Empty)
            }
            Action::PutNetworkInterface(net) => {
                self.require_not_started("PUT /network-interfaces")?;
                net.validate().map_err(err)?;
                // Check the TAP now so a missing or busy one fails this request, not the boot.
                crate::devices::tap::Tap::open(&net.host_dev_name).map_err(|e| {
                    format!(
                        "network interface {}: {}",
                        net.iface_id,
                        crate::error_chain(&e)
                    )
                })?;
                let ifaces = &mut self.config.network_interfaces;
                ifaces.retain(|n| n.iface_id != net.iface_id);
                ifaces.push(net);
                Ok(Reply::Empty)
            }
            Action::PutLogger(logger) => {
                self.require_not_started("PUT /logger")?;
                crate::logger::configure(&logger).map_err(|e| e.to_string())?;
                self.config.logger = Some(logger);
                Ok(Reply::Empty)
            }
            Action::PutMetrics(metrics) => {
                self.require_not_started("PUT /metrics")?;
                self.config.metrics = Some(metrics);
                Ok(Reply::Empty)
            }
            Action::PutSerial(serial) => {
                self.require_not_started("PUT /serial")?;
                self.config.serial = Some(serial);
                Ok(Reply::Empty)
            }
            Action::PutVsock(vsock) => {
                self.require_not_started("PUT /vsock")?;
                self.config.vsock = Some(vsock);
                Ok(Reply::Empty)
            }
            Action::InstanceStart => {
                self.require_not_started("InstanceStart")?;
                self.start()?;
                Ok(Reply::Empty)
            }
            Action::GetMetrics => Ok(Reply::Text(self.prometheus())),
            Action::PatchDrive(update) => {
                self.require_started("PATCH /drives")?;
                self.patch_drive(update)?;
                Ok(Reply::Empty)
            }
            Action::Pause => {
                self.require_started("Pausing")?;
                self.set_vcpus_running(VmState::Paused)?;
                Ok(Reply::Empty)
            }
            Action::Resume => {
                self.require_started("Resuming")?;
                self.set_vcpus_running(VmState::Running)?;
                Ok(Reply::Empty)
            }
            Action::CreateSnapshot(params) => {
                if self.state != VmState::Paused {
                    return Err("snapshots can only be created while the VM is paused".into());
                }
                let Some(vm) = &self.running else {
                    return Err("the VM is not running".into());
                };
                snapshot::create(vm, &self.config, &params).map_err(|e| crate::error_chain(&e))?;
                Ok(Reply::Empty)
            }
            Action::LoadSnapshot(params) => {
                self.require_not_started("Loading a snapshot")?;
                if self.config.boot_source.is_some() || !self.config.drives.is_empty() {
                    return Err("a snapshot must be loaded into a fresh flick, before any boot-source or drive is configured".into());
                }
                self.load_snapshot(&params)?;
                Ok(Reply::Empty)
            }
            Action::FlushMetrics => {
                self.require_started("FlushMetrics")?;
                self.flush_metrics()?;
                Ok(Reply::Empty)
            }
            Action::PatchNetworkInterface(update) => {
                self.require_started("PATCH /network-interfaces")?;
                self.patch_net(&update)?;
                Ok(Reply::Empty)
            }
            Action::SendCtrlAltDel => {
                self.require_started("SendCtrlAltDel")?;
                let Some(vm) = &self.running else {
                    return Err("the VM is not running".into());
                };
                if !lock(&vm.legacy.i8042).send_ctrl_alt_del() {
                    return Err("the keyboard buffer is full; try again".into());
                }
                Ok(Reply::Empty)
            }
        }
    }

    fn build_context(&mut self, started: Instant) -> Result<BuildContext, String> {
        let started_cpu_us = process_cpu_us();
        let path = self
            .config
            .serial
            .as_ref()
            .and_then(|s| s.serial_out_path.clone());
        let serial_out: crate::devices::legacy::SerialOut =
            match (path, self.options.serial_out.take()) {
                (Some(path), _) => Box::new(
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&path)
                        .map_err(|e| format!("cannot open serial_out_path {path}: {e}"))?,
                ),
                (None, Some(out)) => out,
                (None, None) => Box::new(std::io::stdout()),
            };
        Ok(BuildContext {
            host: self.host,
            serial_out,
            boot_timer_log: self.options.boot_timer,
            started,
            started_cpu_us,
            boot_times: self.boot_times.clone(),
        })
    }

    fn load_snapshot(&mut self, params: &crate::config::SnapshotLoadConfig) -> Result<(), String> {
        let started = Instant::now();
        let ctx = self.build_context(started)?;
        let (running, snap) = snapshot::load(params, ctx).map_err(|e| crate::error_chain(&e))?;
        tracing::info!(
            "snapshot loaded in {} us ({} vCPU(s), {} MiB)",
            started.elapsed().as_micros(),
            snap.vcpus.len(),
            snap.config.machine_config.mem_size_mib
        );
        self.config = snap.config;
        self.running = Some(running);
        self.state = if params.resume_vm {
            VmState::Running
        } else {
            VmState::Paused
        };
        Ok(())
    }

    fn start(&mut self) -> Result<(), String> {
        let started = Instant::now();
        let ctx = self.build_context(started)?;
        let running = builder::build(&self.config, ctx).map_err(|e| crate::error_chain(&e))?;
        tracing::info!(
            "VM started: {} vCPU(s), {} MiB, CPU profile {:?} on {} in {} us",
            self.config.machine_config.vcpu_count,
            self.config.machine_config.mem_size_mib,
            running.cpu_profile,
            self.host.describe(),
            started.elapsed().as_micros()
        );
        self.running = Some(running);
        self.state = VmState::Running;
        Ok(())
    }

    /// Pauses (`target` Paused) or resumes (`target` Running) every vCPU.
    fn set_vcpus_running(&mut self, target: VmState) -> Result<(), String> {
        let Some(vm) = &self.running else {
            return Err("the VM is not running".into());
        };
        if self.state == target {
            return Ok(());
        }
        let pause = target == VmState::Paused;
        for vcpu in &vm.vcpus.handles {
            let command = if pause {
                VcpuCommand::Pause
            } else {
                VcpuCommand::Resume
            };
            let _ = vcpu.call(command)?;
        }
        self.state = target;
        tracing::info!("VM {}", if pause { "paused" } else { "resumed" });
        Ok(())
    }

    fn patch_net(&mut self, update: &crate::control::NetUpdate) -> Result<(), String> {
        config::validate_id(&update.iface_id).map_err(|e| e.to_string())?;
        let Some(vm) = &self.running else {
            return Err("the VM is not running".into());
        };
        let iface = vm
            .devices
            .nets
            .iter()
            .find(|n| n.id == update.iface_id)
            .ok_or_else(|| format!("unknown network interface {:?}", update.iface_id))?;
        let (rx, tx) = (
            update.rx_rate_limiter.as_ref(),
            update.tx_rate_limiter.as_ref(),
        );
        lock(&iface.device).set_rate_limiters(rx, tx);
        if let Some(cfg) = self
            .config
            .network_interfaces
            .iter_mut()
            .find(|n| n.iface_id == update.iface_id)
        {
            if let Some(rx) = rx {
                cfg.rx_rate_limiter = Some(*rx);
            }
            if let Some(tx) = tx {
                cfg.tx_rate_limiter = Some(*tx);
            }
        }
        Ok(())
    }

    /// Swaps a drive's backing file and tells the guest its capacity may have changed.
    fn patch_drive(&mut self, update: crate::control::DriveUpdate) -> Result<(), String> {
        config::validate_id(&update.drive_id).map_err(|e| e.to_string())?;
        let Some(vm) = &self.running else {
            return Err("the VM is not running".into());
        };
        let drive = vm
            .devices
            .drives
            .iter()
            .find(|d| d.id == update.drive_id)
            .ok_or_else(|| format!("unknown drive {:?}", update.drive_id))?;
        if let Some(limits) = &update.rate_limiter {
            lock(&drive.device).set_rate_limiter(Some(limits));
            let cfg = self
                .config
                .drives
                .iter_mut()
                .find(|d| d.drive_id == update.drive_id);
            if let Some(cfg) = cfg {
                cfg.rate_limiter = Some(*limits);
            }
        }
        let Some(path) = update.path_on_host else {
            return Ok(());
        };
        let read_only = lock(&drive.device).backing_read_only();
        let backing = crate::devices::virtio::block::Backing::open(&path, read_only)
            .map_err(|e| format!("drive {}: {}", update.drive_id, crate::error_chain(&e)))?;
        lock(&drive.device).swap_backing(backing);
        lock(&drive.transport).notify_config_change();
        if let Some(cfg) = self
            .config
            .drives
            .iter_mut()
            .find(|d| d.drive_id == update.drive_id)
        {
            cfg.path_on_host = path;
        }
        Ok(())
    }

    /// Metrics in Prometheus text format.
    fn prometheus(&self) -> String {
        metrics::prometheus(&metrics::collect(self.running.as_ref(), &self.boot_times))
    }

    /// Appends one JSON line of metrics to the `metrics_path` file.
    fn flush_metrics(&mut self) -> Result<(), String> {
        let Some(path) = self.config.metrics.as_ref().map(|m| m.metrics_path.clone()) else {
            return Err("no metrics file configured (PUT /metrics)".into());
        };
        let mut line =
            metrics::json_line(&metrics::collect(self.running.as_ref(), &self.boot_times));
        line.push('\n');
        use std::io::Write as _;
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(line.as_bytes()))
            .map_err(|e| format!("cannot write metrics to {path}: {e}"))
    }
}
