//! The `flick` binary: command line → configuration, logging, the API thread, the VMM event
//! loop, exit codes. The API socket is bound before anything slow so that clients can connect
//! early, and removed on every way out: normal returns, `std::process::exit`, and termination
//! signals.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, OnceLock};

use clap::Parser;
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};

use flick::api::{self, ApiServer};
use flick::config::{
    LogLevel, LoggerConfig, MemBackendConfig, MemBackendType, MetricsConfig, SnapshotLoadConfig,
    VmConfig,
};
use flick::control::{self, Action, ControlReceiver, Reply};
use flick::devices::boot_timer::{monotonic_us, process_cpu_us};
use flick::seccomp::{Filter, Filters, Role};
use flick::snapshot::FORMAT_VERSION;
use flick::vmm::{Vmm, VmmOptions, VERSION};
use flick::{error_chain, logger};

/// Exit code for a configuration or start-up error.
const EXIT_CONFIG_ERROR: u8 = 1;

/// flick: a lightweight KVM virtual machine monitor with a Firecracker-compatible API.
#[derive(Debug, Parser)]
#[command(name = "flick", version = VERSION, disable_version_flag = true)]
struct Cli {
    /// Path of the unix socket serving the HTTP API [default: /run/firecracker.socket].
    #[arg(long, value_name = "PATH")]
    api_sock: Option<String>,
    /// Largest HTTP request body accepted by the API, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = api::DEFAULT_MAX_PAYLOAD_BYTES)]
    http_api_max_payload_size: usize,
    /// Instance id reported by the API and prefixed to log lines.
    #[arg(long, default_value = "anonymous-instance")]
    id: String,
    /// Configure and boot the VM from this JSON file (Firecracker's config-file shape).
    #[arg(long, value_name = "PATH")]
    config_file: Option<String>,
    /// Do not serve the HTTP API (requires --config-file or --restore-snapshot; --api-sock is
    /// then ignored).
    #[arg(long)]
    no_api: bool,
    /// Restore the VM from this snapshot state file (as `PUT /snapshot/load` does).
    #[arg(
        long,
        value_name = "PATH",
        conflicts_with = "config_file",
        requires = "restore_mem"
    )]
    restore_snapshot: Option<String>,
    /// The memory file of the snapshot given with --restore-snapshot.
    #[arg(long, value_name = "PATH", requires = "restore_snapshot")]
    restore_mem: Option<String>,
    /// Run the restored VM at once instead of leaving it paused.
    #[arg(long, requires = "restore_snapshot")]
    resume: bool,
    /// Log the guest's boot time when it writes the boot-timer byte.
    #[arg(long)]
    boot_timer: bool,
    /// Log level: Off, Error, Warning, Info, Debug, Trace.
    #[arg(long, default_value = "Info")]
    level: LogLevel,
    /// Log only lines from code whose module path starts with this (e.g. `vmm::snapshot`).
    #[arg(long, value_name = "MODULE")]
    module: Option<String>,
    /// Write metrics (Firecracker's JSON schema, one line per flush) to this file or FIFO, as
    /// `PUT /metrics` does.
    #[arg(long, value_name = "PATH")]
    metrics_path: Option<String>,
    /// Write log lines to this file instead of stderr.
    #[arg(long, value_name = "PATH")]
    log_path: Option<String>,
    /// Prefix log lines with their level.
    #[arg(long)]
    show_level: bool,
    /// Prefix log lines with their source file and line.
    #[arg(long)]
    show_log_origin: bool,
    /// When the process was started, in CLOCK_MONOTONIC microseconds (Firecracker's jailer
    /// passes it): the time from then until the API socket listens is logged at Info level.
    #[arg(long, value_name = "US")]
    start_time_us: Option<u64>,
    /// This process's CPU time when it was started, in microseconds (passed by the jailer): the
    /// CPU time used from then until the API socket listens is logged with the start-up time.
    #[arg(long, value_name = "US")]
    start_time_cpu_us: Option<u64>,
    /// CPU time the jailer used before starting this process, in microseconds: added to the
    /// logged start-up CPU time.
    #[arg(long, value_name = "US")]
    parent_cpu_time_us: Option<u64>,
    /// Run without seccomp filters (by default every thread confines itself to its role's
    /// system calls; see docs/security.md).
    #[arg(long, conflicts_with = "seccomp_filter")]
    no_seccomp: bool,
    /// Use the seccomp filters in this file instead of the built-in ones: BPF programs per
    /// thread role as Firecracker's seccompiler-bin writes them (see docs/security.md).
    #[arg(long, value_name = "FILE")]
    seccomp_filter: Option<String>,
    /// Load this JSON file into MMDS at start (as `PUT /mmds` does).
    #[arg(long, value_name = "FILE")]
    metadata: Option<String>,
    /// Largest MMDS document, in bytes [default: the --http-api-max-payload-size value].
    #[arg(long, value_name = "BYTES")]
    mmds_size_limit: Option<usize>,
    /// Print the version and exit.
    #[arg(long)]
    version: bool,
    /// Print the snapshot format version this flick writes and reads, then exit.
    #[arg(long)]
    snapshot_version: bool,
    /// Print the format version of this snapshot state file, then exit.
    #[arg(long, value_name = "PATH")]
    describe_snapshot: Option<String>,
    /// Refused: flick's devices are virtio-mmio only; it has no PCI transport.
    #[arg(long)]
    enable_pci: bool,
}

fn fail(message: &str) -> ExitCode {
    eprintln!("flick: error: {message}");
    ExitCode::from(EXIT_CONFIG_ERROR)
}

fn read_config(path: &str) -> Result<VmConfig, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read config file {path}: {e}"))?;
    VmConfig::from_json(&text).map_err(|e| format!("invalid config file {path}: {e}"))
}

/// Most malloc arenas flick's threads may use. Setting a limit also keeps glibc from reading
/// `/sys/devices/system/cpu/online` the first time a thread needs an arena of its own, a file
/// the API and vCPU filters do not let those threads open.
#[cfg(target_env = "gnu")]
const MALLOC_ARENAS: libc::c_int = 8;

fn main() -> ExitCode {
    // SAFETY: mallopt only changes malloc's tuning; called before any other thread exists.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS);
    }
    read_fd_limit();
    let cli = Cli::parse();
    if cli.version {
        println!("flick v{VERSION}");
        return ExitCode::SUCCESS;
    }
    if cli.snapshot_version {
        println!("{}", flick::snapshot::format_version_string(FORMAT_VERSION));
        return ExitCode::SUCCESS;
    }
    if let Some(path) = &cli.describe_snapshot {
        return match flick::snapshot::describe_state_file(Path::new(path)) {
            Ok(version) => {
                println!("{}", flick::snapshot::format_version_string(version));
                ExitCode::SUCCESS
            }
            Err(e) => fail(&error_chain(&e)),
        };
    }
    if cli.enable_pci {
        return fail("--enable-pci: flick has no PCI transport; its devices are virtio-mmio");
    }
    logger::init(&cli.id, cli.level);
    let log = LoggerConfig {
        log_path: cli.log_path.clone(),
        level: Some(cli.level),
        show_level: cli.show_level,
        show_log_origin: cli.show_log_origin,
        module: cli.module.clone(),
    };
    if let Err(e) = logger::configure(&log) {
        return fail(&error_chain(&e));
    }
    if let Err(e) = flick::seccomp::install_sigsys_handler() {
        return fail(&format!("cannot install the SIGSYS handler: {e}"));
    }
    if let Some(fd) = logger::file_fd() {
        flick::seccomp::report_to(fd);
    }
    let filters = match seccomp_filters(&cli) {
        Ok(filters) => filters,
        Err(message) => return fail(&message),
    };
    let config = match cli.config_file.as_deref().map(read_config) {
        None if cli.no_api && cli.restore_snapshot.is_none() => {
            return fail("--no-api requires --config-file or --restore-snapshot")
        }
        None => None,
        Some(Ok(config)) => Some(config),
        Some(Err(message)) => return fail(&message),
    };
    let (api, control) = if cli.no_api {
        (None, None)
    } else {
        let path = cli.api_sock.as_deref().unwrap_or(api::DEFAULT_SOCKET_PATH);
        let filter = filters.get(Role::Api).cloned();
        match start_api(Path::new(path), cli.http_api_max_payload_size, filter) {
            Ok((server, control)) => (Some(server), Some(control)),
            Err(message) => return fail(&message),
        }
    };

    let startup_time = report_startup_time(&cli);

    let options = VmmOptions {
        instance_id: cli.id.clone(),
        boot_timer: cli.boot_timer,
        serial_out: None,
        serial_in: true,
        vcpu_seccomp: filters.get(Role::Vcpu).cloned(),
        api_metrics: api.as_ref().map(ApiServer::metrics_source),
        startup_time,
    };
    let mut vmm = Vmm::new(options, control);
    if let Some(path) = &cli.metrics_path {
        let metrics = MetricsConfig {
            metrics_path: path.clone(),
            emit_id: false,
            properties: None,
        };
        if let Reply::Error(error) = vmm.handle(Action::PutMetrics(metrics)) {
            return fail(&error.message);
        }
    }
    if let Err(message) = init_mmds(&mut vmm, &cli) {
        return fail(&message);
    }
    tracing::info!("flick v{VERSION} on {}", vmm.host().describe());
    if let Some(config) = &config {
        for action in Action::from_config(config)
            .into_iter()
            .chain([Action::InstanceStart])
        {
            if let Reply::Error(error) = vmm.handle(action) {
                return fail(&error.message);
            }
        }
    }
    if let (Some(state), Some(mem)) = (&cli.restore_snapshot, &cli.restore_mem) {
        let load = SnapshotLoadConfig {
            snapshot_path: state.clone(),
            mem_backend: Some(MemBackendConfig {
                backend_type: MemBackendType::File,
                backend_path: mem.clone(),
            }),
            mem_file_path: None,
            enable_diff_snapshots: false,
            track_dirty_pages: false,
            resume_vm: cli.resume,
            network_overrides: Vec::new(),
            clock_realtime: false,
            vsock_override: None,
        };
        if let Reply::Error(error) = vmm.handle(Action::LoadSnapshot(load)) {
            return fail(&error.message);
        }
    }
    // Set-up is done: from here on the VMM thread runs confined to its event loop's calls.
    if let Err(e) = filters.install(Role::Vmm) {
        return fail(&error_chain(&e));
    }
    run(vmm, api, filters.get(Role::Teardown).cloned())
}

/// Logs how long start-up took (process start to API socket listening; with `--no-api`, to
/// the same point), as Firecracker reports it in its `process_startup_time_us` and
/// `process_startup_time_cpu_us` metrics, when the jailer told us when it started.
fn report_startup_time(cli: &Cli) -> Option<(u64, Option<u64>)> {
    let start_us = cli.start_time_us?;
    let wall_us = monotonic_us().saturating_sub(start_us);
    let cpu_us = cli.start_time_cpu_us.map(|start_cpu_us| {
        process_cpu_us().saturating_sub(start_cpu_us) + cli.parent_cpu_time_us.unwrap_or(0)
    });
    match cpu_us {
        Some(cpu_us) => tracing::info!("process startup time: {wall_us} us, {cpu_us} CPU us"),
        None => tracing::info!("process startup time: {wall_us} us"),
    }
    Some((wall_us, cpu_us))
}

/// Applies `--mmds-size-limit` and loads `--metadata`.
fn init_mmds(vmm: &mut Vmm, cli: &Cli) -> Result<(), String> {
    vmm.set_mmds_size_limit(cli.mmds_size_limit.unwrap_or(cli.http_api_max_payload_size));
    let Some(path) = &cli.metadata else {
        return Ok(());
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read metadata file {path}: {e}"))?;
    let data: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
        let e = flick::config::describe_json_error(&e);
        format!("invalid metadata file {path}: {e}")
    })?;
    match vmm.handle(Action::PutMmds(data)) {
        Reply::Error(e) => Err(format!("cannot load metadata file {path}: {}", e.message)),
        _ => Ok(()),
    }
}

/// The seccomp filters asked for on the command line: none, a file's, or the built-in ones.
fn seccomp_filters(cli: &Cli) -> Result<Filters, String> {
    let filters = if cli.no_seccomp {
        Filters::none()
    } else if let Some(path) = &cli.seccomp_filter {
        Filters::from_file(Path::new(path)).map_err(|e| error_chain(&e))?
    } else {
        Filters::builtin().map_err(|e| {
            format!(
                "{} (no built-in seccomp filters for this target: use --no-seccomp or \
                 --seccomp-filter)",
                error_chain(&e)
            )
        })?
    };
    Ok(filters)
}

/// Signals after which the API socket is removed.
const TERMINATION_SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

/// Binds the API socket, starts the API thread and arranges for the socket to be removed if a
/// termination signal ends the process. The signals stay blocked from before the bind until the
/// handler is in place, so none can leave the socket behind; the API threads keep them blocked.
fn start_api(
    path: &Path,
    max_payload: usize,
    filter: Option<Filter>,
) -> Result<(ApiServer, ControlReceiver), String> {
    let (handle, control) =
        control::channel().map_err(|e| format!("cannot create the API channel: {e}"))?;
    let previous = mask_termination_signals(libc::SIG_BLOCK, None);
    let started = api::start(path, max_payload, handle, filter);
    if let Ok(server) = &started {
        remove_socket_on_signal(server.socket_path());
    }
    mask_termination_signals(libc::SIG_SETMASK, previous);
    let server = started.map_err(|e| error_chain(&e))?;
    Ok((server, control))
}

/// Blocks the termination signals (`SIG_BLOCK`) or restores a saved mask (`SIG_SETMASK`) for
/// this thread; returns the mask in force before.
fn mask_termination_signals(
    how: libc::c_int,
    restore: Option<libc::sigset_t>,
) -> Option<libc::sigset_t> {
    // SAFETY: sigset_t is plain data; sigemptyset, sigaddset and pthread_sigmask only write to
    // the sets passed by pointer, which live on this stack frame.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        match restore {
            Some(saved) => set = saved,
            None => {
                libc::sigemptyset(&mut set);
                for signal in TERMINATION_SIGNALS {
                    libc::sigaddset(&mut set, signal);
                }
            }
        }
        let mut old: libc::sigset_t = std::mem::zeroed();
        (libc::pthread_sigmask(how, &set, &mut old) == 0).then_some(old)
    }
}

/// The socket path the signal handler unlinks.
static SIGNAL_UNLINK_PATH: OnceLock<CString> = OnceLock::new();

extern "C" fn unlink_and_reraise(signal: libc::c_int) {
    if let Some(path) = SIGNAL_UNLINK_PATH.get() {
        // SAFETY: unlink is async-signal-safe; `path` is a NUL-terminated string that is never
        // freed (it lives in a static).
        unsafe { libc::unlink(path.as_ptr()) };
    }
    // SAFETY: signal and raise are async-signal-safe. Restoring the default action and raising
    // the signal again ends the process the way the signal would have.
    unsafe {
        libc::signal(signal, libc::SIG_DFL);
        libc::raise(signal);
    }
}

/// Removes the API socket when SIGTERM, SIGINT or SIGHUP ends the process.
fn remove_socket_on_signal(path: &Path) {
    let Ok(path) = CString::new(path.as_os_str().as_bytes()) else {
        return;
    };
    if SIGNAL_UNLINK_PATH.set(path).is_err() {
        return;
    }
    for signal in TERMINATION_SIGNALS {
        // SAFETY: installs a handler that only calls async-signal-safe functions; the previous
        // action is not needed.
        unsafe {
            libc::signal(
                signal,
                unlink_and_reraise as *const () as libc::sighandler_t,
            );
        }
    }
}

/// Runs the event loop until the VMM decides to exit.
fn run(vmm: Vmm, api: Option<ApiServer>, teardown_filter: Option<Filter>) -> ExitCode {
    let mut events: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
        match EventManager::new() {
            Ok(em) => em,
            Err(e) => return fail(&format!("cannot create the event loop: {e:?}")),
        };
    let vmm = Arc::new(Mutex::new(vmm));
    events.add_subscriber(vmm.clone());
    loop {
        let slots = vmm
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take_new_subscribers();
        for slot in slots {
            events.add_subscriber(Arc::new(Mutex::new(slot)));
        }
        if let Err(e) = events.run() {
            return fail(&format!("event loop failed: {e:?}"));
        }
        let guard = vmm.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(status) = guard.exit_status() {
            if let Some(message) = &status.message {
                eprintln!("flick: guest error: {message}");
            }
            let code = status.code;
            guard.park_vcpus();
            drop(guard);
            if let Some(api) = &api {
                api.cleanup();
            }
            defer_teardown(teardown_filter.as_ref());
            tracing::debug!("exiting with code {code}");
            // vCPU threads may still be inside KVM_RUN; exiting the process ends them.
            std::process::exit(code);
        }
    }
}

/// One more than the highest fd this process may open (`RLIMIT_NOFILE`), read at start-up
/// (the VMM filter has no call to read it later).
static FD_LIMIT: OnceLock<libc::c_int> = OnceLock::new();

/// Most fds scanned when `/proc` is not mounted.
const MAX_FD_SCAN: libc::c_int = 1 << 16;

fn read_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct we pass.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    let scan = if rc == 0 {
        libc::c_int::try_from(limit.rlim_cur).unwrap_or(MAX_FD_SCAN)
    } else {
        MAX_FD_SCAN
    };
    let _ = FD_LIMIT.set(scan.min(MAX_FD_SCAN));
}

/// Without `/proc` (in a jail): every open fd below the limit that is not an anonymous inode
/// (those have no file type in `st_mode`).
fn fds_to_release_without_proc() -> Vec<libc::c_int> {
    let limit = FD_LIMIT.get().copied().unwrap_or(MAX_FD_SCAN);
    (0..limit)
        .filter(|&fd| {
            // SAFETY: `stat` is plain data, valid when zeroed.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            // SAFETY: fstat writes the stat struct we own; an fd that is not open gives EBADF.
            let rc = unsafe { libc::fstat(fd, &mut st) };
            rc == 0 && st.st_mode & libc::S_IFMT != 0
        })
        .collect()
}

/// The fds a teardown child must close: files, devices, sockets and pipes (TAPs, drive locks,
/// the API socket, our standard streams), but not anonymous kernel objects.
fn fds_to_release() -> Vec<libc::c_int> {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return fds_to_release_without_proc();
    };
    dir.filter_map(|entry| {
        let entry = entry.ok()?;
        let fd: libc::c_int = entry.file_name().to_str()?.parse().ok()?;
        let target = std::fs::read_link(entry.path()).ok()?;
        // Keep KVM's objects and the eventfds and timers wired to them (releasing an irqfd's
        // eventfd here would put its shutdown back on our exit path).
        let kernel_object = target
            .to_str()
            .is_some_and(|t| t.starts_with("anon_inode:"));
        (!kernel_object).then_some(fd)
    })
    .collect()
}

/// What the teardown child needs: prepared before it starts, since it shares our memory.
struct Reaper {
    release: Vec<libc::c_int>,
    pipe: [libc::c_int; 2],
    /// Its write end is closed by the child once the fds in `release` are closed.
    released: [libc::c_int; 2],
    /// The child's own seccomp filter (the program it points at is leaked with the `Reaper`).
    filter: Option<libc::sock_fprog>,
}

extern "C" fn reap(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` points at the leaked `Reaper` that `defer_teardown` built for this child.
    let reaper = unsafe { &*(arg as *const Reaper) };
    let mut byte = 0u8;
    // SAFETY: installing a filter from a prepared program, closing fds of this child's own fd
    // table, reading one byte into a local and exiting: no allocation or locks. If the filter
    // cannot be installed the child still runs under the VMM filter it inherited.
    unsafe {
        if let Some(program) = &reaper.filter {
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                0,
                program as *const libc::sock_fprog,
            );
        }
        libc::close(reaper.pipe[1]);
        for &fd in &reaper.release {
            libc::close(fd);
        }
        libc::close(reaper.released[0]);
        libc::close(reaper.released[1]);
        libc::read(reaper.pipe[0], (&mut byte as *mut u8).cast(), 1);
        libc::_exit(0)
    }
}

/// Lets a child process hold the last references to the VM while this process exits, so that
/// the kernel's teardown (VM destruction, and releasing an address space that KVM watched, which
/// waits for a grace period: together ~20 ms on a nested host) happens after our exit status is
/// delivered rather than before. The child shares our address space (`CLONE_VM`), so our exit
/// does not tear it down, and keeps only anonymous kernel objects such as the KVM fds (so TAPs,
/// drive locks, sockets and our standard streams are released with us: this process waits until
/// the child has closed its copies, so a drive's lock or a TAP is free for the next VM once our
/// exit status is delivered). It waits for a pipe to close (it closes when this process is gone),
/// then exits, releasing everything.
fn defer_teardown(filter: Option<&Filter>) {
    const STACK_BYTES: usize = 64 * 1024;
    let mut pipe = [0 as libc::c_int; 2];
    // Closed by the child once it has released its copies of our fds.
    let mut released = [0 as libc::c_int; 2];
    // SAFETY: pipe writes two fds into each array we own; on failure of the second, the first
    // pair is closed again.
    unsafe {
        if libc::pipe(pipe.as_mut_ptr()) != 0 {
            return;
        }
        if libc::pipe(released.as_mut_ptr()) != 0 {
            libc::close(pipe[0]);
            libc::close(pipe[1]);
            return;
        }
    }
    // Listed after the pipes exist, so a number freed by the listing itself is not mistaken
    // for theirs.
    let release = fds_to_release()
        .into_iter()
        .filter(|fd| !pipe.contains(fd) && !released.contains(fd))
        .collect();
    // The program must outlive the child: leak a handle on it along with the rest.
    let filter = filter.map(|f| Box::leak(Box::new(f.clone())).as_fprog());
    let reaper: &'static Reaper = Box::leak(Box::new(Reaper {
        release,
        pipe,
        released,
        filter,
    }));
    let stack: &'static mut [u8] = Box::leak(vec![0u8; STACK_BYTES].into_boxed_slice());
    // The stack grows down from its (16-byte aligned) end.
    let top = (stack.as_mut_ptr() as usize + STACK_BYTES) & !0xf;
    // SAFETY: the child runs `reap` on its own leaked stack with leaked arguments, touching no
    // other shared state; both outlive it because they are never freed.
    let pid = unsafe {
        libc::clone(
            reap,
            top as *mut libc::c_void,
            libc::CLONE_VM | libc::SIGCHLD,
            reaper as *const Reaper as *mut libc::c_void,
        )
    };
    // SAFETY: closing the read end (the child has its own copy of the fd table); on failure
    // also the write end. Then waiting (a read into a local) until the child has closed its
    // copy of `released`'s write end, after its copies of the released fds, or has died.
    unsafe {
        libc::close(pipe[0]);
        libc::close(released[1]);
        if pid < 0 {
            libc::close(pipe[1]);
        } else {
            let mut byte = 0u8;
            while libc::read(released[0], (&mut byte as *mut u8).cast(), 1) < 0
                && *libc::__errno_location() == libc::EINTR
            {}
        }
        libc::close(released[0]);
    }
}
