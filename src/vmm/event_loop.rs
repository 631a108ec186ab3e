//! The VMM thread's event handling: guest reset, vCPU stops, API wake-ups, console input and
//! periodic metrics, as the event-manager subscriber of [`Vmm`].

use std::io::ErrorKind;
use std::os::fd::AsRawFd;

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use super::{
    ExitStatus, VmState, Vmm, EXIT_GUEST_FAULT, MAX_PENDING_INPUT, METRICS_PERIOD, STDIN_FD,
};
use crate::devices::bus::lock;
use crate::kvm::vcpu::StopReason;

impl Vmm {
    fn finish(&mut self, status: ExitStatus) {
        if self.exit.is_none() {
            self.state = VmState::Exited;
            self.exit = Some(status);
        }
    }

    fn on_reset(&mut self) {
        if let Some(vm) = &self.running {
            let _ = vm.legacy.reset.read();
        }
        tracing::info!("guest requested a reset through the i8042 controller; exiting");
        self.finish(ExitStatus {
            code: 0,
            message: None,
        });
    }

    fn on_vcpu_stopped(&mut self) {
        let Some(vm) = &self.running else { return };
        let _ = vm.vcpus.wake.read();
        let events: Vec<_> = vm.vcpus.events.try_iter().collect();
        for event in events {
            match event.reason {
                StopReason::GuestShutdown => {
                    tracing::info!("vCPU {} reported a guest shutdown; exiting", event.index);
                    self.finish(ExitStatus {
                        code: 0,
                        message: None,
                    });
                }
                StopReason::Fault(message) => {
                    self.finish(ExitStatus {
                        code: EXIT_GUEST_FAULT,
                        message: Some(message),
                    });
                }
            }
        }
    }

    fn on_control(&mut self, ops: &mut EventOps) {
        let Some(control) = &self.control else { return };
        let _ = control.wake.read();
        let requests: Vec<_> = control.receiver.try_iter().collect();
        for request in requests {
            let reply = self.handle(request.action);
            let _ = request.reply.send(reply);
        }
        self.watch_vm(ops);
    }

    /// Moves console input into the serial FIFO, as much as fits.
    fn pump_input(&mut self, ops: &mut EventOps, readable: bool) {
        if self.running.is_none() {
            return;
        }
        if readable && self.pending_input.len() < MAX_PENDING_INPUT {
            let mut buf = [0u8; 1024];
            match read_stdin(&mut buf) {
                Ok(0) => self.close_stdin(ops),
                Ok(n) => self.pending_input.extend_from_slice(&buf[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::Interrupted | ErrorKind::WouldBlock) => {}
                Err(e) => {
                    tracing::warn!("console input: {e}; no more input is read");
                    self.close_stdin(ops);
                }
            }
        }
        if let (false, Some(vm)) = (self.pending_input.is_empty(), &self.running) {
            let taken = lock(&vm.legacy.serial).enqueue_input(&self.pending_input);
            self.pending_input.drain(..taken);
        }
        // Stop reading while input is backed up; the drained event resumes it.
        if self.stdin_open {
            let full = self.pending_input.len() >= MAX_PENDING_INPUT;
            let set = if full {
                EventSet::empty()
            } else {
                EventSet::IN
            };
            let _ = ops.modify(Events::with_data_raw(STDIN_FD, 0, set));
        }
    }

    fn close_stdin(&mut self, ops: &mut EventOps) {
        let _ = ops.remove(Events::empty_raw(STDIN_FD));
        self.stdin_open = false;
    }

    /// Registers the running VM's fds once it exists.
    fn watch_vm(&mut self, ops: &mut EventOps) {
        if self.watching_vm {
            return;
        }
        let Some(vm) = &self.running else { return };
        let fds = [
            vm.legacy.reset.as_raw_fd(),
            vm.vcpus.wake.as_raw_fd(),
            vm.legacy.serial_drained.as_raw_fd(),
        ];
        for fd in fds {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                tracing::error!("cannot watch VM event fd {fd}: {e:?}");
            }
        }
        if self.stdin_open && ops.add(Events::new_raw(STDIN_FD, EventSet::IN)).is_err() {
            // Regular files cannot be polled: no console input then.
            self.stdin_open = false;
        }
        if self.config.metrics.is_some() {
            match vmm_sys_util::timerfd::TimerFd::new() {
                Ok(mut timer) => {
                    let armed = timer.reset(METRICS_PERIOD, Some(METRICS_PERIOD)).is_ok()
                        && ops
                            .add(Events::new_raw(timer.as_raw_fd(), EventSet::IN))
                            .is_ok();
                    if armed {
                        self.metrics_timer = Some(timer);
                    }
                    // As Firecracker: the first line at once, then one per period.
                    if let Err(e) = self.flush_metrics() {
                        tracing::warn!("{e}");
                    }
                }
                Err(e) => tracing::warn!("no periodic metrics: {e}"),
            }
        }
        self.watching_vm = true;
    }
}
impl MutEventSubscriber for Vmm {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        let control_fd = self.control.as_ref().map(|c| c.wake.as_raw_fd());
        if Some(fd) == control_fd {
            self.on_control(ops);
            return;
        }
        if let Some(timer) = self.metrics_timer.as_mut().filter(|t| t.as_raw_fd() == fd) {
            let _ = timer.wait();
            if let Err(e) = self.flush_metrics() {
                tracing::warn!("{e}");
            }
            return;
        }
        let Some(vm) = &self.running else { return };
        if fd == vm.legacy.reset.as_raw_fd() {
            self.on_reset();
        } else if fd == vm.vcpus.wake.as_raw_fd() {
            self.on_vcpu_stopped();
        } else if fd == vm.legacy.serial_drained.as_raw_fd() {
            let _ = vm.legacy.serial_drained.read();
            self.pump_input(ops, false);
        } else if fd == STDIN_FD {
            let readable = events.event_set().contains(EventSet::IN)
                || events.event_set().contains(EventSet::HANG_UP);
            self.pump_input(ops, readable);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Some(control) = &self.control {
            if let Err(e) = ops.add(Events::new(&control.wake, EventSet::IN)) {
                tracing::error!("cannot watch the API channel: {e:?}");
            }
        }
        self.watch_vm(ops);
    }
}

/// One `read(2)` of fd 0. Not through `std::io::stdin()`: that buffers, and bytes kept in its
/// buffer are invisible to epoll, so input beyond one read would wait for the next keystroke.
fn read_stdin(buf: &mut [u8]) -> std::io::Result<usize> {
    // SAFETY: read writes at most `buf.len()` bytes into `buf`, which we own.
    let n = unsafe { libc::read(STDIN_FD, buf.as_mut_ptr().cast(), buf.len()) };
    usize::try_from(n).map_err(|_| std::io::Error::last_os_error())
}
