//! vCPU setup and run loop. Each vCPU runs on its own thread and reaches devices only through the
//! port and MMIO buses; anything that ends the VM is reported to the VMM thread as a [`VcpuEvent`].

use std::cell::Cell;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Once};
use std::thread;
use std::time::Duration;

use kvm_bindings::CpuId;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::current::regs::{self, EntryMode};
use crate::devices::bus::Bus;
use crate::kvm::state::VcpuState;

const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("cannot configure vCPU {0}: {1}")]
    Configure(u8, &'static str, #[source] kvm_ioctls::Error),
    #[error("cannot spawn the thread of vCPU {0}")]
    Spawn(u8, #[source] std::io::Error),
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

/// How vCPU `index` starts: CPUID and, for the boot vCPU, the entry point.
#[derive(Debug)]
pub struct VcpuSetup {
    pub index: u8,
    pub cpuid: CpuId,
    pub entry: Option<(EntryMode, u64)>,
}

/// Applies CPUID, MSRs, LAPIC, FPU and (boot vCPU) registers.
pub fn configure(fd: &VcpuFd, setup: &VcpuSetup) -> Result<(), VcpuError> {
    let fail = |what| move |e| VcpuError::Configure(setup.index, what, e);
    fd.set_cpuid2(&setup.cpuid).map_err(fail("CPUID"))?;
    let msrs = regs::boot_msrs();
    let written = fd.set_msrs(&msrs).map_err(fail("MSRs"))?;
    if written != msrs.as_slice().len() {
        tracing::debug!(
            "vCPU {}: KVM accepted {written} of {} boot MSRs",
            setup.index,
            msrs.as_slice().len()
        );
    }
    regs::set_lint(fd).map_err(fail("LAPIC"))?;
    fd.set_fpu(&regs::boot_fpu()).map_err(fail("FPU"))?;
    if let Some((mode, entry)) = setup.entry {
        let sregs = fd.get_sregs().map_err(fail("special registers"))?;
        fd.set_sregs(&regs::boot_sregs(sregs, mode))
            .map_err(fail("special registers"))?;
        fd.set_regs(&regs::boot_regs(mode, entry))
            .map_err(fail("registers"))?;
    }
    Ok(())
}

/// A request from the VMM thread to a vCPU thread.
#[derive(Debug)]
pub enum VcpuCommand {
    Pause,
    Resume,
    /// Capture the vCPU's state (only meaningful while paused), trying these MSRs.
    SaveState(Arc<Vec<u32>>),
}

/// A vCPU thread's answer to a [`VcpuCommand`].
#[derive(Debug)]
pub enum VcpuResponse {
    Paused,
    Resumed,
    State(Result<Box<VcpuState>, String>),
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

/// The VMM thread's handle on a running vCPU thread.
#[derive(Debug)]
pub struct VcpuHandle {
    pub index: u8,
    thread: thread::JoinHandle<()>,
    commands: mpsc::Sender<VcpuCommand>,
    responses: mpsc::Receiver<VcpuResponse>,
}

/// How long a vCPU may take to acknowledge a command.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);

impl VcpuHandle {
    /// Asks the thread to park and kicks it out of `KVM_RUN`, without waiting for the answer
    /// (used on the way out, so a guest spinning after its reset stops using a CPU).
    pub fn park(&self) {
        if self.commands.send(VcpuCommand::Pause).is_ok() {
            // SAFETY: as in `call`: the thread is alive and the kick handler is installed.
            unsafe { libc::pthread_kill(self.thread.as_pthread_t(), kick_signal()) };
        }
    }

    /// Sends `command`, kicks the thread out of `KVM_RUN`, and waits for its answer.
    pub fn call(&self, command: VcpuCommand) -> Result<VcpuResponse, String> {
        self.commands
            .send(command)
            .map_err(|_| format!("vCPU {} has stopped", self.index))?;
        // SAFETY: the thread is alive (it holds the command receiver we just sent to), and the
        // kick signal has a handler installed before any vCPU thread starts.
        unsafe { libc::pthread_kill(self.thread.as_pthread_t(), kick_signal()) };
        self.responses
            .recv_timeout(COMMAND_TIMEOUT)
            .map_err(|_| format!("vCPU {} did not answer", self.index))
    }
}

/// Everything a vCPU thread needs.
pub struct Vcpu {
    pub fd: VcpuFd,
    pub index: u8,
    /// The CPUID this vCPU was given, saved with its state.
    pub cpuid: CpuId,
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
        })
    }

    /// Handles pending commands; while paused, blocks until resumed. `false` when the VMM is
    /// gone and the thread should end.
    fn handle_commands(
        &mut self,
        commands: &mpsc::Receiver<VcpuCommand>,
        responses: &mpsc::Sender<VcpuResponse>,
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
            let answer = match next {
                Ok(VcpuCommand::Pause) => {
                    paused = true;
                    self.complete_pending_io();
                    VcpuResponse::Paused
                }
                Ok(VcpuCommand::SaveState(msrs)) => VcpuResponse::State(
                    VcpuState::capture(&self.fd, &self.cpuid, &msrs)
                        .map(Box::new)
                        .map_err(|e| format!("vCPU {}: {}", self.index, crate::error_chain(&e))),
                ),
                Ok(VcpuCommand::Resume) => {
                    paused = false;
                    VcpuResponse::Resumed
                }
                Err(mpsc::TryRecvError::Empty) => return true,
                Err(mpsc::TryRecvError::Disconnected) => return false,
            };
            let _ = responses.send(answer);
        }
    }

    fn run(mut self, commands: mpsc::Receiver<VcpuCommand>, responses: mpsc::Sender<VcpuResponse>) {
        let run_area: *mut kvm_bindings::kvm_run = self.fd.get_kvm_run();
        KVM_RUN.with(|cell| cell.set(run_area));
        let reason = loop {
            if !self.handle_commands(&commands, &responses) {
                return;
            }
            match self.run_once() {
                Ok(None) => {
                    if self.stopping.load(Ordering::Relaxed) {
                        self.start_paused = true;
                    }
                    continue;
                }
                Ok(Some(reason)) => break reason,
                Err(message) => break StopReason::Fault(message),
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
    fn run_once(&mut self) -> Result<Option<StopReason>, String> {
        let exit = match self.fd.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.fd.set_kvm_immediate_exit(0);
                return Ok(None);
            }
            Err(e) => return Err(format!("KVM_RUN failed: {e}")),
        };
        let stats = &self.stats;
        match exit {
            VcpuExit::IoIn(port, data) => {
                stats.io_in.fetch_add(1, Ordering::Relaxed);
                if !self.pio.read(u64::from(port), data) {
                    stats.unclaimed.fetch_add(1, Ordering::Relaxed);
                    data.fill(0xff);
                }
            }
            VcpuExit::IoOut(port, data) => {
                stats.io_out.fetch_add(1, Ordering::Relaxed);
                if !self.pio.write(u64::from(port), data) {
                    stats.unclaimed.fetch_add(1, Ordering::Relaxed);
                }
            }
            VcpuExit::MmioRead(addr, data) => {
                stats.mmio_read.fetch_add(1, Ordering::Relaxed);
                if !self.mmio.read(addr, data) {
                    stats.unclaimed.fetch_add(1, Ordering::Relaxed);
                    data.fill(0);
                }
            }
            VcpuExit::MmioWrite(addr, data) => {
                stats.mmio_write.fetch_add(1, Ordering::Relaxed);
                if !self.mmio.write(addr, data) {
                    stats.unclaimed.fetch_add(1, Ordering::Relaxed);
                }
            }
            VcpuExit::SystemEvent(kind, _)
                if kind == KVM_SYSTEM_EVENT_SHUTDOWN || kind == KVM_SYSTEM_EVENT_RESET =>
            {
                return Ok(Some(StopReason::GuestShutdown));
            }
            VcpuExit::Shutdown => return Err(self.describe("triple fault (KVM_EXIT_SHUTDOWN)")),
            VcpuExit::Hlt => return Err(self.describe("halt with interrupts off (KVM_EXIT_HLT)")),
            VcpuExit::InternalError => {
                let what = self.internal_error();
                return Err(self.describe(&what));
            }
            VcpuExit::FailEntry(reason, cpu) => {
                let what = format!("VM entry failed (reason {reason:#x} on host cpu {cpu})");
                return Err(self.describe(&what));
            }
            other => {
                stats.other.fetch_add(1, Ordering::Relaxed);
                let what = format!("unexpected exit {other:?}");
                return Err(self.describe(&what));
            }
        }
        Ok(None)
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

    /// Names the vCPU, RIP and the instruction bytes there.
    fn describe(&self, what: &str) -> String {
        let Ok(regs) = self.fd.get_regs() else {
            return format!("vCPU {} stopped: {what}", self.index);
        };
        let bytes = self
            .fd
            .translate_gva(regs.rip)
            .ok()
            .filter(|t| t.valid != 0)
            .and_then(|t| {
                let mut buf = [0u8; 15];
                self.mem
                    .read_slice(&mut buf, GuestAddress(t.physical_address))
                    .ok()?;
                Some(
                    buf.iter()
                        .map(|b| format!("{b:02x}"))
                        .collect::<Vec<_>>()
                        .join(" "),
                )
            })
            .unwrap_or_else(|| "unavailable".into());
        format!(
            "vCPU {} stopped: {what} at RIP {:#x} (instruction bytes: {bytes})",
            self.index, regs.rip
        )
    }
}
