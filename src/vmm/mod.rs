//! The VMM thread: owns the VM's lifecycle and every device's state, answers [`Action`]s, and runs
//! the event loop (event-manager) that watches the API wake-up, guest reset, vCPU stops and the
//! console input.
//!
//! Lifecycle: `NotStarted → Running ⇄ Paused → Exited`. An action in the wrong state is refused
//! with an error reply, never a panic. Imports `config`, `control`, `devices`, `kvm`, `arch`,
//! `boot`; nothing imports this module except `main`.

pub mod builder;
pub mod error;
mod event_loop;
pub mod lifecycle;
pub mod metrics;
pub mod registry;
pub mod snapshot;
pub mod uffd;

use std::sync::Arc;
use std::time::Instant;

use crate::arch::{Arch, Current, HostKind};
use crate::config::{self, VmConfig};
use crate::control::{Action, ControlReceiver, Reply};
use crate::devices::boot_timer::{process_cpu_us, BootTimes};
use crate::devices::bus::lock;
use crate::devices::legacy::SerialOut;
use crate::devices::virtio::balloon::{self, BalloonChange};
use crate::devices::virtio::{block, net, DeviceError, DeviceUpdate};
use crate::kvm::vcpu::VcpuCommand;
use builder::{BuildContext, RunningVm};
pub use error::VmmError;
pub use lifecycle::VmState;

/// The VMM's version, reported by `GET /` and `GET /version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The Firecracker API version whose endpoints and fields flick serves (see
/// docs/firecracker-compat.md for what differs). `GET /` (`vmm_version`) and `GET /version`
/// (`firecracker_version`) report it, as clients use them to decide which API calls exist;
/// flick's own version is in `flick_version` and `flick --version`.
pub const FIRECRACKER_API_VERSION: &str = "1.16.0";

/// Exit code when the guest stopped on an error (emulation failure, triple fault, ...).
pub const EXIT_GUEST_FAULT: i32 = 3;

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
    /// The seccomp filter of the vCPU threads (`None`: they run unfiltered).
    pub vcpu_seccomp: Option<crate::seccomp::Filter>,
    /// The API server's samples, written to `metrics_path` with the VMM's.
    pub api_metrics: Option<crate::metrics::Source>,
    /// Process start to API socket listening, wall and CPU microseconds (when the start time was
    /// given with `--start-time-us`).
    pub startup_time: Option<(u64, Option<u64>)>,
}

impl std::fmt::Debug for VmmOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmmOptions")
            .field("instance_id", &self.instance_id)
            .finish_non_exhaustive()
    }
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
    /// Metrics lines a slow or absent metrics reader did not take.
    metrics_lines_lost: u64,
    /// Counter values as of the last line written to `metrics_path`.
    metrics_previous: metrics::FcPrevious,
    /// Console output bytes dropped by the serial rate limiter.
    serial_dropped: Arc<std::sync::atomic::AtomicU64>,
    /// How long the last pause, resume, snapshot creation and load took.
    latencies: metrics::Latencies,
    /// The MMDS data store, shared with the interfaces that answer for it.
    mmds: crate::mmds::SharedMmds,
}

impl std::fmt::Debug for Vmm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vmm")
            .field("state", &self.state)
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

pub(crate) const STDIN_FD: i32 = 0;
/// How often metrics are appended to `metrics_path` (Firecracker's period).
pub(crate) const METRICS_PERIOD: std::time::Duration = std::time::Duration::from_secs(60);
pub(crate) const MAX_PENDING_INPUT: usize = 4096;

fn json<T: serde::Serialize>(value: &T) -> Result<Reply, VmmError> {
    serde_json::to_string(value)
        .map(Reply::Json)
        .map_err(VmmError::Encode)
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
            metrics_lines_lost: 0,
            metrics_previous: metrics::FcPrevious::new(),
            serial_dropped: Arc::default(),
            latencies: metrics::Latencies::default(),
            mmds: crate::mmds::shared(crate::mmds::Mmds::default()),
        }
    }

    /// Sets the largest MMDS document accepted, in bytes (`--mmds-size-limit`).
    pub fn set_mmds_size_limit(&mut self, bytes: usize) {
        crate::mmds::lock(&self.mmds).set_size_limit(bytes);
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

    /// Answers one action. The same entry point serves the API, the config file and the CLI.
    pub fn handle(&mut self, action: Action) -> Reply {
        tracing::debug!("action: {}", lifecycle::action_name(&action));
        match self.dispatch(action) {
            Ok(reply) => reply,
            Err(e) => {
                let error = e.to_action_error();
                if error.class == crate::control::ErrorClass::Internal {
                    tracing::error!("{}", error.message);
                } else {
                    tracing::debug!("action refused: {}", error.message);
                }
                Reply::Error(error)
            }
        }
    }

    fn dispatch(&mut self, action: Action) -> Result<Reply, VmmError> {
        lifecycle::check(&action, self.state)?;
        match action {
            Action::GetInstanceInfo => json(&serde_json::json!({
                "id": self.options.instance_id,
                "state": self.state.as_str(),
                "vmm_version": FIRECRACKER_API_VERSION,
                "app_name": "flick",
                "flick_version": VERSION,
            })),
            Action::GetVersion => json(&serde_json::json!({
                "firecracker_version": FIRECRACKER_API_VERSION,
                "flick_version": VERSION,
            })),
            Action::GetVmConfig => json(&self.config),
            Action::GetMachineConfig => json(&self.config.machine_config),
            Action::PutMachineConfig(mc) => {
                mc.validate()?;
                self.config.machine_config = mc;
                Ok(Reply::Empty)
            }
            Action::PatchMachineConfig(update) => {
                let mc = update.apply(&self.config.machine_config);
                mc.validate()?;
                self.config.machine_config = mc;
                Ok(Reply::Empty)
            }
            Action::PutBootSource(boot) => {
                boot.validate()?;
                self.config.boot_source = Some(boot);
                Ok(Reply::Empty)
            }
            Action::PutDrive(drive) => {
                self.put_drive(drive)?;
                Ok(Reply::Empty)
            }
            Action::PutNetworkInterface(net) => {
                net.validate()?;
                // Check the TAP now so a missing or busy one fails this request, not the boot.
                crate::devices::tap::Tap::open(&net.host_dev_name).map_err(|e| {
                    VmmError::from(DeviceError::from(e).of(net::KIND.noun, &net.iface_id))
                })?;
                let ifaces = &mut self.config.network_interfaces;
                ifaces.retain(|n| n.iface_id != net.iface_id);
                ifaces.push(net);
                Ok(Reply::Empty)
            }
            Action::PutLogger(logger) => {
                crate::logger::configure(&logger)?;
                if let Some(fd) = crate::logger::file_fd() {
                    crate::seccomp::report_to(fd);
                }
                self.config.logger = Some(logger);
                Ok(Reply::Empty)
            }
            Action::PutMetrics(metrics) => {
                if self.config.metrics.is_some() {
                    return Err(VmmError::MetricsConfigured);
                }
                // A FIFO whose reader is not there yet (ENXIO) is fine: lines written before
                // it comes are counted as lost.
                match open_metrics_file(&metrics.metrics_path) {
                    Err(e) if e.raw_os_error() != Some(libc::ENXIO) => {
                        return Err(VmmError::OpenMetrics(metrics.metrics_path.clone(), e));
                    }
                    _ => {}
                }
                self.config.metrics = Some(metrics);
                Ok(Reply::Empty)
            }
            Action::PutSerial(serial) => {
                self.config.serial = Some(serial);
                Ok(Reply::Empty)
            }
            Action::PutEntropy(entropy) => {
                self.config.entropy = Some(entropy);
                Ok(Reply::Empty)
            }
            Action::PutVsock(vsock) => {
                vsock.validate()?;
                // The listener is created at boot; a path already taken fails this request.
                if std::fs::symlink_metadata(&vsock.uds_path).is_ok() {
                    return Err(VmmError::UdsPathExists(vsock.uds_path));
                }
                self.config.vsock = Some(vsock);
                Ok(Reply::Empty)
            }
            Action::PutBalloon(balloon) => {
                let mem_size_mib = self.config.machine_config.mem_size_mib;
                config::validate_balloon_amount(balloon.amount_mib, mem_size_mib)?;
                self.config.balloon = Some(balloon);
                Ok(Reply::Empty)
            }
            Action::GetBalloon => json(self.config.balloon.as_ref().ok_or(VmmError::NoBalloon)?),
            Action::PatchBalloon(update) => {
                self.config.balloon.ok_or(VmmError::NoBalloon)?;
                let mem_size_mib = self.config.machine_config.mem_size_mib;
                config::validate_balloon_amount(update.amount_mib, mem_size_mib)?;
                let change = BalloonChange::TargetMib(update.amount_mib);
                self.update_device(&balloon::KIND, balloon::ID, DeviceUpdate::Balloon(change))?;
                Ok(Reply::Empty)
            }
            Action::PatchBalloonStats(update) => {
                self.config.balloon.ok_or(VmmError::NoBalloon)?;
                let change = BalloonChange::StatsIntervalS(update.stats_polling_interval_s);
                self.update_device(&balloon::KIND, balloon::ID, DeviceUpdate::Balloon(change))?;
                Ok(Reply::Empty)
            }
            Action::GetBalloonStats => {
                self.config.balloon.ok_or(VmmError::NoBalloon)?;
                let vm = self.running()?;
                json(&vm.devices.report(&balloon::KIND, balloon::ID)?)
            }
            Action::GetMmds => Ok(Reply::Json(crate::mmds::lock(&self.mmds).document())),
            Action::PutMmds(data) => {
                crate::mmds::lock(&self.mmds).put(data)?;
                Ok(Reply::Empty)
            }
            Action::PatchMmds(patch) => {
                crate::mmds::lock(&self.mmds).patch(&patch)?;
                Ok(Reply::Empty)
            }
            Action::PutMmdsConfig(mmds) => {
                mmds.validate(&self.config.network_interfaces)?;
                crate::mmds::lock(&self.mmds).configure(mmds.version, mmds.imds_compat);
                self.config.mmds_config = Some(mmds);
                Ok(Reply::Empty)
            }
            Action::InstanceStart => {
                self.start()?;
                Ok(Reply::Empty)
            }
            Action::GetMetrics => Ok(Reply::Text(self.prometheus())),
            Action::PatchDrive(update) => {
                config::validate_id(&update.drive_id)?;
                let id = update.drive_id.clone();
                self.update_device(&block::KIND, &id, DeviceUpdate::Drive(update))?;
                Ok(Reply::Empty)
            }
            Action::PatchNetworkInterface(update) => {
                config::validate_id(&update.iface_id)?;
                let id = update.iface_id.clone();
                self.update_device(&net::KIND, &id, DeviceUpdate::Net(update))?;
                Ok(Reply::Empty)
            }
            Action::Pause => {
                let started = Instant::now();
                self.set_vcpus_running(VmState::Paused)?;
                self.latencies.record(metrics::Latency::Pause, started);
                Ok(Reply::Empty)
            }
            Action::Resume => {
                let started = Instant::now();
                self.set_vcpus_running(VmState::Running)?;
                self.latencies.record(metrics::Latency::Resume, started);
                Ok(Reply::Empty)
            }
            Action::CreateSnapshot(params) => {
                let started = Instant::now();
                let vm = self.running()?;
                snapshot::create(vm, &self.config, &params)?;
                self.latencies
                    .record(metrics::Latency::CreateSnapshot, started);
                Ok(Reply::Empty)
            }
            Action::LoadSnapshot(params) => {
                if self.config.boot_source.is_some() || !self.config.drives.is_empty() {
                    return Err(VmmError::LoadIntoConfigured);
                }
                let started = Instant::now();
                self.load_snapshot(&params)?;
                self.latencies
                    .record(metrics::Latency::LoadSnapshot, started);
                Ok(Reply::Empty)
            }
            Action::FlushMetrics => {
                self.flush_metrics()?;
                Ok(Reply::Empty)
            }
            Action::SendCtrlAltDel => {
                let vm = self.running()?;
                let keyboard = vm
                    .legacy
                    .i8042
                    .as_ref()
                    .ok_or(VmmError::NoKeyboard(Current::NAME))?;
                if !lock(keyboard).send_ctrl_alt_del() {
                    return Err(VmmError::KeyboardFull);
                }
                Ok(Reply::Empty)
            }
        }
    }

    /// The running VM; the lifecycle rules guarantee one exists once started.
    fn running(&self) -> Result<&RunningVm, VmmError> {
        self.running
            .as_ref()
            .ok_or(VmmError::State(lifecycle::StateError::BeforeStart(
                "this action",
            )))
    }

    fn put_drive(&mut self, drive: config::DriveConfig) -> Result<(), VmmError> {
        drive.validate()?;
        // Check the backing file now so a bad path fails this request, not the boot.
        block::Backing::open(&drive.path_on_host, drive.is_read_only)
            .map_err(|e| DeviceError::from(e).of(block::KIND.noun, &drive.drive_id))?;
        let drives = &mut self.config.drives;
        let others = drives.iter().filter(|d| d.drive_id != drive.drive_id);
        if drive.is_root_device && others.clone().any(|d| d.is_root_device) {
            return Err(config::ConfigError::TwoRootDrives.into());
        }
        if let Some(existing) = drives.iter_mut().find(|d| d.drive_id == drive.drive_id) {
            *existing = drive;
        } else if drives.len() >= config::MAX_DRIVES {
            return Err(config::ConfigError::TooManyDrives.into());
        } else {
            drives.push(drive);
        }
        Ok(())
    }

    /// A runtime update of one device, recorded in the configuration once applied.
    fn update_device(
        &mut self,
        kind: &crate::devices::virtio::DeviceKind,
        id: &str,
        update: DeviceUpdate,
    ) -> Result<(), VmmError> {
        let Some(vm) = &self.running else {
            return Err(lifecycle::StateError::BeforeStart(kind.noun).into());
        };
        vm.devices.update(kind, id, &update, &mut self.config)?;
        Ok(())
    }

    fn build_context(&mut self, started: Instant) -> Result<BuildContext, VmmError> {
        let started_cpu_us = process_cpu_us();
        let path = self
            .config
            .serial
            .as_ref()
            .and_then(|s| s.serial_out_path.clone());
        let limit = self.config.serial.as_ref().and_then(|s| s.rate_limiter);
        let serial_out: crate::devices::legacy::SerialOut =
            match (path, self.options.serial_out.take()) {
                (Some(path), _) => Box::new(
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&path)
                        .map_err(|e| VmmError::SerialOut(path.clone(), e))?,
                ),
                (None, Some(out)) => out,
                (None, None) => Box::new(std::io::stdout()),
            };
        let serial_out = match limit {
            Some(bucket) => crate::devices::legacy::LimitedOut::wrap(
                serial_out,
                &bucket,
                self.serial_dropped.clone(),
            ),
            None => serial_out,
        };
        Ok(BuildContext {
            host: self.host,
            serial_out,
            boot_timer_log: self.options.boot_timer,
            started,
            started_cpu_us,
            boot_times: self.boot_times.clone(),
            vcpu_seccomp: self.options.vcpu_seccomp.clone(),
            mmds: self.mmds.clone(),
        })
    }

    fn load_snapshot(
        &mut self,
        params: &crate::config::SnapshotLoadConfig,
    ) -> Result<(), VmmError> {
        let started = Instant::now();
        let ctx = self.build_context(started)?;
        let (running, snap) = snapshot::load(params, ctx)?;
        tracing::info!(
            "snapshot loaded in {} us ({} vCPU(s), {} MiB)",
            started.elapsed().as_micros(),
            snap.vcpus.len(),
            snap.machine.mem_size_mib
        );
        let mut config = snap.base_config();
        running.devices.describe(&mut config)?;
        self.config = config;
        self.running = Some(running);
        self.state = if params.resume_vm {
            VmState::Running
        } else {
            VmState::Paused
        };
        Ok(())
    }

    fn start(&mut self) -> Result<(), VmmError> {
        let started = Instant::now();
        let ctx = self.build_context(started)?;
        let running = builder::build(&self.config, ctx)?;
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

    /// Pauses (`target` Paused) or resumes (`target` Running) every vCPU. A failed pause
    /// resumes the vCPUs it had already paused, so the VM is never left half paused.
    fn set_vcpus_running(&mut self, target: VmState) -> Result<(), VmmError> {
        let vm = self.running()?;
        if self.state == target {
            return Ok(());
        }
        let pause = target == VmState::Paused;
        let (action, command): (&'static str, fn() -> VcpuCommand) = if pause {
            ("pause", || VcpuCommand::Pause)
        } else {
            ("resume", || VcpuCommand::Resume)
        };
        for (done, vcpu) in vm.vcpus.handles.iter().enumerate() {
            if let Err(source) = vcpu.call(command()) {
                if pause {
                    for paused in &vm.vcpus.handles[..done] {
                        if let Err(e) = paused.call(VcpuCommand::Resume) {
                            tracing::error!(
                                "cannot resume vCPU {} after a failed pause: {e}",
                                paused.index
                            );
                        }
                    }
                }
                return Err(VmmError::Vcpus { action, source });
            }
        }
        self.state = target;
        tracing::info!("VM {}", if pause { "paused" } else { "resumed" });
        Ok(())
    }

    /// The VMM's samples (the API server adds its own to `GET /metrics`).
    fn samples(&self) -> Vec<crate::metrics::Sample> {
        let mut samples = metrics::collect(self.running.as_ref(), &self.boot_times);
        samples.push(metrics::lines_lost(self.metrics_lines_lost));
        if let Some((wall_us, cpu_us)) = self.options.startup_time {
            samples.extend(metrics::startup_time(wall_us, cpu_us));
        }
        self.latencies.samples(&mut samples);
        samples.push(metrics::serial_rate_limited(
            self.serial_dropped
                .load(std::sync::atomic::Ordering::Relaxed),
        ));
        samples
    }

    /// Metrics in Prometheus text format.
    fn prometheus(&self) -> String {
        let mut text = String::new();
        crate::metrics::prometheus(&self.samples(), &mut text);
        text
    }

    /// Appends one JSON line of metrics to the `metrics_path` file. The file is opened and
    /// written without blocking: a FIFO nobody reads (or whose reader is behind) loses the line,
    /// which is counted, instead of stalling the VMM thread and with it the API.
    fn flush_metrics(&mut self) -> Result<(), VmmError> {
        let Some(config) = self.config.metrics.as_ref() else {
            return Err(VmmError::NoMetricsPath);
        };
        let path = config.metrics_path.clone();
        let header = metrics::FcHeader {
            utc_timestamp_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            id: config.emit_id.then(|| self.options.instance_id.clone()),
            properties: config.properties.clone(),
        };
        let mut samples = self.samples();
        if let Some(api) = &self.options.api_metrics {
            api(&mut samples);
        }
        let (mut line, now) = metrics::firecracker_line(&samples, &header, &self.metrics_previous);
        line.push('\n');
        use std::io::Write as _;
        let written = open_metrics_file(&path).and_then(|mut f| f.write(line.as_bytes()));
        match written {
            Ok(n) if n == line.len() => {
                self.metrics_previous = now;
                Ok(())
            }
            Ok(_) => {
                self.metrics_lines_lost += 1;
                crate::warn_limited!("metrics line to {path} was cut short: its reader is behind");
                Ok(())
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.raw_os_error() == Some(libc::ENXIO) =>
            {
                self.metrics_lines_lost += 1;
                crate::warn_limited!("metrics line to {path} lost: nobody is reading it ({e})");
                Ok(())
            }
            Err(e) => Err(VmmError::WriteMetrics(path, e)),
        }
    }
}

/// Opens the metrics file or FIFO for appending without blocking (created if missing).
fn open_metrics_file(path: &str) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
}
