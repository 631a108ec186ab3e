//! The vCPU threads and their run loop. Each vCPU runs on its own thread and reaches devices only
//! through the port and MMIO buses; exits only an architecture knows go to
//! [`Arch::handle_exit`]; anything that ends the VM is reported to the VMM thread as a
//! [`VcpuEvent`]. Commands from the VMM thread carry a sequence number that their answer repeats,
//! so an answer that arrives after its caller gave up is never taken for the next one's.

use std::cell::Cell;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Once};
use std::thread;
use std::time::{Duration, Instant};

use crate::memory::GuestMemoryMmap;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::{Arch, ArchError, ArchExit, Current};
use crate::devices::bus::Bus;

const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("cannot spawn the thread of vCPU {0}")]
    Spawn(u8, #[source] std::io::Error),
    #[error("vCPU {0} has stopped")]
    Stopped(u8),
    #[error("vCPU {index} did not answer within {ms} ms", ms = COMMAND_TIMEOUT.as_millis())]
    Timeout { index: u8 },
    #[error("vCPU {0} gave an unexpected answer")]
    UnexpectedAnswer(u8),
    #[error("vCPU {0}")]
    State(u8, #[source] ArchError),
}

/// Exit counters of one vCPU, read by the metrics code.
#[derive(Debug, Default)]
pub struct VcpuStats {
    pub io_in: AtomicU64,
    pub io_out: AtomicU64,
    pub mmio_read: AtomicU64,
    pub mmio_write: AtomicU64,
    pub unclaimed: AtomicU64,
    pub other: AtomicU64,
}

/// Why a vCPU stopped running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// The guest asked for a reset or power-off through KVM.
    GuestShutdown,
    /// The guest cannot continue; the message names the exit, RIP and instruction bytes.
    Fault(String),
}

/// A vCPU's message to the VMM thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VcpuEvent {
    pub index: u8,
    pub reason: StopReason,
}

/// A request from the VMM thread to a vCPU thread.
#[derive(Debug)]
pub enum VcpuCommand {
    Pause,
    Resume,
    /// Capture the vCPU's state (only meaningful while paused).
    SaveState(<Current as Arch>::SaveContext),
}

/// A vCPU thread's answer to a [`VcpuCommand`].
#[derive(Debug)]
pub enum VcpuResponse {
    Paused,
    Resumed,
    State(Result<Box<<Current as Arch>::VcpuState>, ArchError>),
}

thread_local! {
    /// This thread's `kvm_run` area, for the kick signal handler.
    static KVM_RUN: Cell<*mut kvm_bindings::kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer is this thread's own mapped kvm_run area, set before the first
        // KVM_RUN and valid for the thread's life; a byte store is async-signal-safe.
        unsafe { (*run).immediate_exit = 1 };
    }
}

/// The signal that kicks a vCPU thread out of `KVM_RUN`.
fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Err(e) = vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler) {
            tracing::error!("cannot install the vCPU kick signal handler: {e}");
        }
    });
}

/// Blocks every asynchronous signal on the calling vCPU thread except the kick signal, so that
/// process-directed signals (termination, for instance) are handled on the VMM thread, and a
/// vCPU thread never runs a handler its seccomp policy does not foresee.
fn only_kick_signal() {
    // SAFETY: sigset_t is plain data; the set functions and pthread_sigmask only write to the
    // sets passed by pointer, which live on this stack frame.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut set);
        for signal in [
            kick_signal(),
            libc::SIGSEGV,
            libc::SIGBUS,
            libc::SIGFPE,
            libc::SIGILL,
            libc::SIGTRAP,
            libc::SIGSYS,
        ] {
            libc::sigdelset(&mut set, signal);
        }
        libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
    }
}

/// The VMM thread's handle on a running vCPU thread.
#[derive(Debug)]
pub struct VcpuHandle {
    pub index: u8,
    thread: thread::JoinHandle<()>,
    commands: mpsc::Sender<(u64, VcpuCommand)>,
    responses: mpsc::Receiver<(u64, VcpuResponse)>,
    next_seq: Cell<u64>,
}

/// How long a vCPU may take to acknowledge a command.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);

impl VcpuHandle {
    /// Asks the thread to park and kicks it out of `KVM_RUN`, without waiting for the answer
    /// (used on the way out, so a guest spinning after its reset stops using a CPU).
    pub fn park(&self) {
        let seq = self.take_seq();
        if self.commands.send((seq, VcpuCommand::Pause)).is_ok() {
            // SAFETY: as in `call`: the thread is alive and the kick handler is installed.
            unsafe { libc::pthread_kill(self.thread.as_pthread_t(), kick_signal()) };
        }
    }

    fn take_seq(&self) -> u64 {
        let seq = self.next_seq.get();
        self.next_seq.set(seq + 1);
        seq
    }

    /// Sends `command`, kicks the thread out of `KVM_RUN`, and waits for its answer. Answers to
    /// earlier commands whose callers timed out are discarded.
    pub fn call(&self, command: VcpuCommand) -> Result<VcpuResponse, VcpuError> {
        let seq = self.take_seq();
        self.commands
            .send((seq, command))
            .map_err(|_| VcpuError::Stopped(self.index))?;
        // SAFETY: the thread is alive (it holds the command receiver we just sent to), and the
        // kick signal has a handler installed before any vCPU thread starts.
        unsafe { libc::pthread_kill(self.thread.as_pthread_t(), kick_signal()) };
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.responses.recv_timeout(left) {
                Ok((answered, response)) if answered == seq => return Ok(response),
                Ok(_) => continue,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err(VcpuError::Timeout { index: self.index })
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(VcpuError::Stopped(self.index))
                }
            }
        }
    }
}

/// Everything a vCPU thread needs.
pub struct Vcpu {
    pub fd: VcpuFd,
    pub index: u8,
    /// What the architecture configured this vCPU with, saved with its state.
    pub config: <Current as Arch>::VcpuConfig,
    /// Start parked, waiting for a Resume command (restored snapshots).
    pub start_paused: bool,
    /// Set by a device when the guest asked to stop the machine (i8042 reset): the vCPU then
    /// parks instead of running more guest code while the VMM winds down.
    pub stopping: Arc<std::sync::atomic::AtomicBool>,
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub mem: GuestMemoryMmap,
    pub stats: Arc<VcpuStats>,
    pub events: mpsc::Sender<VcpuEvent>,
    pub wake: EventFd,
    /// Installed by the thread before it first enters the guest.
    pub seccomp: Option<crate::seccomp::Filter>,
}

impl std::fmt::Debug for Vcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vcpu")
            .field("index", &self.index)
            .field("start_paused", &self.start_paused)
            .finish_non_exhaustive()
    }
}

impl Vcpu {
    /// Starts the run loop on a new thread.
    pub fn spawn(self) -> Result<VcpuHandle, VcpuError> {
        install_kick_handler();
        let index = self.index;
        let (commands, command_rx) = mpsc::channel();
        let (response_tx, responses) = mpsc::channel();
        let thread = thread::Builder::new()
            .name(format!("flick_vcpu{index}"))
            .stack_size(256 * 1024)
            .spawn(move || self.run(command_rx, response_tx))
            .map_err(|e| VcpuError::Spawn(index, e))?;
        Ok(VcpuHandle {
            index,
            thread,
            commands,
            responses,
            next_seq: Cell::new(0),
        })
    }

    /// Handles pending commands; while paused, blocks until resumed. `false` when the VMM is
    /// gone and the thread should end.
    fn handle_commands(
        &mut self,
        commands: &mpsc::Receiver<(u64, VcpuCommand)>,
        responses: &mpsc::Sender<(u64, VcpuResponse)>,
    ) -> bool {
        let mut paused = std::mem::take(&mut self.start_paused);
        loop {
            let next = if paused {
                commands
                    .recv()
                    .map_err(|_| mpsc::TryRecvError::Disconnected)
            } else {
                commands.try_recv()
            };
            let (seq, command) = match next {
                Ok(next) => next,
                Err(mpsc::TryRecvError::Empty) => return true,
                Err(mpsc::TryRecvError::Disconnected) => return false,
            };
            let answer = match command {
                VcpuCommand::Pause => {
                    paused = true;
                    self.complete_pending_io();
                    VcpuResponse::Paused
                }
                VcpuCommand::SaveState(context) => VcpuResponse::State(
                    Current::save_vcpu(&self.fd, &self.config, &context).map(Box::new),
                ),
                VcpuCommand::Resume => {
                    paused = false;
                    VcpuResponse::Resumed
                }
            };
            let _ = responses.send((seq, answer));
        }
    }

    fn run(
        mut self,
        commands: mpsc::Receiver<(u64, VcpuCommand)>,
        responses: mpsc::Sender<(u64, VcpuResponse)>,
    ) {
        only_kick_signal();
        crate::seccomp::install_or_exit(self.seccomp.as_ref(), crate::seccomp::Role::Vcpu);
        let run_area: *mut kvm_bindings::kvm_run = self.fd.get_kvm_run();
        KVM_RUN.with(|cell| cell.set(run_area));
        let reason = loop {
            if !self.handle_commands(&commands, &responses) {
                return;
            }
            match self.run_once() {
                None => {
                    if self.stopping.load(Ordering::Relaxed) {
                        self.start_paused = true;
                    }
                    continue;
                }
                Some(reason) => break reason,
            }
        };
        KVM_RUN.with(|cell| cell.set(std::ptr::null_mut()));
        let _ = self.events.send(VcpuEvent {
            index: self.index,
            reason,
        });
        let _ = self.wake.write(1);
    }

    /// Lets KVM finish an I/O exit we already answered, without running guest code, so saved
    /// state is complete.
    fn complete_pending_io(&mut self) {
        self.fd.set_kvm_immediate_exit(1);
        let _ = self.fd.run();
        self.fd.set_kvm_immediate_exit(0);
    }

    /// Runs the guest until one exit; `Some` when the vCPU must stop.
    fn run_once(&mut self) -> Option<StopReason> {
        let exit = match self.fd.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.fd.set_kvm_immediate_exit(0);
                return None;
            }
            Err(e) => return Some(StopReason::Fault(format!("KVM_RUN failed: {e}"))),
        };
        let stats = &self.stats;
        let count = |c: &AtomicU64| {
            c.fetch_add(1, Ordering::Relaxed);
        };
        let fault = match exit {
            VcpuExit::MmioRead(addr, data) => {
                count(&stats.mmio_read);
                if !self.mmio.read(addr, data) {
                    count(&stats.unclaimed);
                    data.fill(0);
                }
                return None;
            }
            VcpuExit::MmioWrite(addr, data) => {
                count(&stats.mmio_write);
                if !self.mmio.write(addr, data) {
                    count(&stats.unclaimed);
                }
                return None;
            }
            VcpuExit::SystemEvent(kind, _)
                if kind == KVM_SYSTEM_EVENT_SHUTDOWN || kind == KVM_SYSTEM_EVENT_RESET =>
            {
                return Some(StopReason::GuestShutdown);
            }
            VcpuExit::InternalError => self.internal_error(),
            VcpuExit::FailEntry(reason, cpu) => {
                format!("VM entry failed (reason {reason:#x} on host cpu {cpu})")
            }
            other => match Current::handle_exit(other, &self.pio) {
                ArchExit::PortIo { read, claimed } => {
                    count(if read { &stats.io_in } else { &stats.io_out });
                    if !claimed {
                        count(&stats.unclaimed);
                    }
                    return None;
                }
                ArchExit::Fault(what) => what,
                ArchExit::Unknown => {
                    count(&stats.other);
                    let reason = self.fd.get_kvm_run().exit_reason;
                    format!("unexpected exit (KVM exit reason {reason})")
                }
            },
        };
        Some(StopReason::Fault(self.describe(&fault)))
    }

    /// Reads KVM's internal-error details.
    fn internal_error(&mut self) -> String {
        let run = self.fd.get_kvm_run();
        // SAFETY: the last exit was KVM_EXIT_INTERNAL_ERROR, so `internal` is the active member.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let n = (internal.ndata as usize).min(internal.data.len());
        let data: Vec<String> = internal.data[..n]
            .iter()
            .map(|d| format!("{d:#x}"))
            .collect();
        let kind = match internal.suberror {
            1 => "emulation failure",
            2 => "simultaneous exceptions",
            3 => "delivery event failure",
            _ => "unknown suberror",
        };
        format!(
            "KVM internal error {} ({kind}), data [{}]",
            internal.suberror,
            data.join(", ")
        )
    }

    /// Names the vCPU, what stopped it and where it is.
    fn describe(&self, what: &str) -> String {
        format!(
            "vCPU {} stopped: {what}{}",
            self.index,
            Current::stop_location(&self.fd, &self.mem)
        )
    }
}
