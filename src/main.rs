//! The `flick` binary: command line → configuration, logging, the VMM event loop, exit codes.

use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use clap::Parser;
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};

use flick::config::{LogLevel, LoggerConfig, VmConfig};
use flick::control::{Action, Reply};
use flick::vmm::{Vmm, VmmOptions, VERSION};
use flick::{error_chain, logger};

/// Exit code for a configuration or start-up error.
const EXIT_CONFIG_ERROR: u8 = 1;

/// flick: a lightweight KVM virtual machine monitor with a Firecracker-compatible API.
#[derive(Debug, Parser)]
#[command(name = "flick", version = VERSION, disable_version_flag = true)]
struct Cli {
    /// Path of the unix socket serving the HTTP API.
    #[arg(long, value_name = "PATH")]
    api_sock: Option<String>,
    /// Instance id reported by the API and prefixed to log lines.
    #[arg(long, default_value = "anonymous-instance")]
    id: String,
    /// Configure and boot the VM from this JSON file (Firecracker's config-file shape).
    #[arg(long, value_name = "PATH")]
    config_file: Option<String>,
    /// Do not serve the HTTP API (requires --config-file).
    #[arg(long)]
    no_api: bool,
    /// Log the guest's boot time when it writes the boot-timer byte.
    #[arg(long)]
    boot_timer: bool,
    /// Log level: Off, Error, Warning, Info, Debug, Trace.
    #[arg(long, default_value = "Warning")]
    level: LogLevel,
    /// Write log lines to this file instead of stderr.
    #[arg(long, value_name = "PATH")]
    log_path: Option<String>,
    /// Prefix log lines with their level.
    #[arg(long)]
    show_level: bool,
    /// Prefix log lines with their source file and line.
    #[arg(long)]
    show_log_origin: bool,
    /// Accepted for Firecracker compatibility.
    #[arg(long, value_name = "US")]
    start_time_us: Option<u64>,
    /// Accepted for Firecracker compatibility.
    #[arg(long, value_name = "US")]
    start_time_cpu_us: Option<u64>,
    /// Accepted for Firecracker compatibility (flick installs no seccomp filter yet).
    #[arg(long)]
    no_seccomp: bool,
    /// Print the version and exit.
    #[arg(long)]
    version: bool,
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.version {
        println!("flick v{VERSION}");
        return ExitCode::SUCCESS;
    }
    logger::init(&cli.id, cli.level);
    let log = LoggerConfig {
        log_path: cli.log_path.clone(),
        level: Some(cli.level),
        show_level: cli.show_level,
        show_log_origin: cli.show_log_origin,
        module: None,
    };
    if let Err(e) = logger::configure(&log) {
        return fail(&error_chain(&e));
    }
    if cli.api_sock.is_some() || !cli.no_api {
        return fail(
            "the HTTP API is not available in this build; use --config-file with --no-api",
        );
    }
    let Some(config_path) = cli.config_file.as_deref() else {
        return fail("--no-api requires --config-file");
    };
    let config = match read_config(config_path) {
        Ok(config) => config,
        Err(message) => return fail(&message),
    };

    let options = VmmOptions {
        instance_id: cli.id.clone(),
        boot_timer: cli.boot_timer,
        serial_out: None,
        serial_in: true,
    };
    let mut vmm = Vmm::new(options, None);
    tracing::info!("flick v{VERSION} on {}", vmm.host().describe());
    for action in Action::from_config(&config)
        .into_iter()
        .chain([Action::InstanceStart])
    {
        if let Reply::Error(message) = vmm.handle(action) {
            return fail(&message);
        }
    }
    run(vmm)
}

/// Runs the event loop until the VMM decides to exit.
fn run(vmm: Vmm) -> ExitCode {
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
            drop(guard);
            // vCPU threads may still be inside KVM_RUN; exiting the process ends them.
            std::process::exit(code);
        }
    }
}
