//! The i8042 keyboard controller, enough for Linux and for `SendCtrlAltDel`: controller commands
//! (self-test, command byte, reset line), a keyboard that acknowledges its commands, an output
//! buffer the guest reads through port 0x60, and IRQ 1 when data waits. The CPU-reset command
//! (`0xFE` on port 0x64) ends the VM.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vm_superio::Trigger;

use super::bus::BusDevice;
use super::EventFdTrigger;

const DATA: u64 = 0; // port 0x60
const COMMAND: u64 = 4; // port 0x64

const STATUS_OUTPUT_FULL: u8 = 0x01;
const STATUS_SYSTEM: u8 = 0x04;
const STATUS_LAST_WAS_COMMAND: u8 = 0x08;
const STATUS_KBD_UNLOCKED: u8 = 0x10;

const CMD_READ_CONFIG: u8 = 0x20;
const CMD_WRITE_CONFIG: u8 = 0x60;
const CMD_DISABLE_AUX: u8 = 0xa7;
const CMD_ENABLE_AUX: u8 = 0xa8;
const CMD_TEST_AUX: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_TEST_KBD: u8 = 0xab;
const CMD_DISABLE_KBD: u8 = 0xad;
const CMD_ENABLE_KBD: u8 = 0xae;
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
const CMD_WRITE_KBD_BUFFER: u8 = 0xd2;
const CMD_RESET_CPU: u8 = 0xfe;

const CONFIG_KBD_INTERRUPT: u8 = 0x01;
const KBD_ACK: u8 = 0xfa;
const KBD_RESET: u8 = 0xff;
const KBD_SELF_TEST_OK: u8 = 0xaa;
const BUFFER_LIMIT: usize = 16;

/// Ctrl, Alt, Delete pressed then released, in scancode set 2 (what Firecracker sends).
pub const CTRL_ALT_DEL: [u8; 10] = [0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0];
const CTRL_RELEASE_TAIL: u8 = 0x14;

/// The controller and its keyboard.
#[derive(Debug)]
pub struct I8042 {
    reset: EventFdTrigger,
    /// Raised with the reset line, for the vCPUs to stop running guest code.
    stopping: Arc<AtomicBool>,
    interrupt: EventFdTrigger,
    config: u8,
    status: u8,
    buffer: VecDeque<u8>,
    /// A controller command waiting for its data byte on port 0x60.
    pending: Option<u8>,
}

impl I8042 {
    /// `reset` is signalled when the guest pulses the reset line, `interrupt` raises IRQ 1.
    pub fn new(
        reset: EventFdTrigger,
        interrupt: EventFdTrigger,
        stopping: Arc<AtomicBool>,
    ) -> Self {
        I8042 {
            reset,
            stopping,
            interrupt,
            config: CONFIG_KBD_INTERRUPT,
            status: STATUS_SYSTEM | STATUS_KBD_UNLOCKED,
            buffer: VecDeque::new(),
            pending: None,
        }
    }

    fn push(&mut self, byte: u8) {
        if self.buffer.len() < BUFFER_LIMIT {
            self.buffer.push_back(byte);
        }
        self.status |= STATUS_OUTPUT_FULL;
        if self.config & CONFIG_KBD_INTERRUPT != 0 {
            let _ = self.interrupt.trigger();
        }
    }

    /// Queues Ctrl+Alt+Del key presses for the guest (`SendCtrlAltDel`). Returns false when the
    /// output buffer has no room for the whole sequence.
    pub fn send_ctrl_alt_del(&mut self) -> bool {
        if self.buffer.len() + CTRL_ALT_DEL.len() + 1 > BUFFER_LIMIT {
            return false;
        }
        for byte in CTRL_ALT_DEL.into_iter().chain([CTRL_RELEASE_TAIL]) {
            self.push(byte);
        }
        true
    }

    fn command(&mut self, cmd: u8) {
        self.status |= STATUS_LAST_WAS_COMMAND;
        match cmd {
            CMD_READ_CONFIG => self.push(self.config),
            CMD_WRITE_CONFIG | CMD_WRITE_OUTPUT_PORT | CMD_WRITE_KBD_BUFFER => {
                self.pending = Some(cmd)
            }
            CMD_SELF_TEST => self.push(0x55),
            CMD_TEST_KBD | CMD_TEST_AUX => self.push(0x00),
            CMD_READ_OUTPUT_PORT => self.push(0x01),
            CMD_DISABLE_KBD | CMD_ENABLE_KBD | CMD_DISABLE_AUX | CMD_ENABLE_AUX => {}
            CMD_RESET_CPU => {
                self.stopping.store(true, Ordering::Relaxed);
                // A failed eventfd write cannot be reported to the guest; the VMM sees no reset.
                let _ = self.reset.trigger();
            }
            _ => {}
        }
    }

    fn data(&mut self, byte: u8) {
        self.status &= !STATUS_LAST_WAS_COMMAND;
        match self.pending.take() {
            Some(CMD_WRITE_CONFIG) => self.config = byte,
            Some(CMD_WRITE_KBD_BUFFER) => self.push(byte),
            Some(_) => {}
            // A byte for the keyboard itself: acknowledge it; a reset also passes its self-test.
            None => {
                self.push(KBD_ACK);
                if byte == KBD_RESET {
                    self.push(KBD_SELF_TEST_OK);
                }
            }
        }
    }

    fn read_data(&mut self) -> u8 {
        let byte = self.buffer.pop_front().unwrap_or(0);
        if self.buffer.is_empty() {
            self.status &= !STATUS_OUTPUT_FULL;
        } else if self.config & CONFIG_KBD_INTERRUPT != 0 {
            let _ = self.interrupt.trigger();
        }
        byte
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if data.len() != 1 {
            return;
        }
        data[0] = match offset {
            DATA => self.read_data(),
            COMMAND => self.status,
            _ => 0,
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let [byte] = data else { return };
        match offset {
            DATA => self.data(*byte),
            COMMAND => self.command(*byte),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    fn trigger() -> (EventFdTrigger, EventFd) {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let observer = evt.try_clone().unwrap();
        (EventFdTrigger(evt), observer)
    }

    fn setup() -> (I8042, EventFd, EventFd) {
        let (reset, reset_seen) = trigger();
        let (irq, irq_seen) = trigger();
        (I8042::new(reset, irq, Arc::default()), reset_seen, irq_seen)
    }

    fn inb(dev: &mut I8042, offset: u64) -> u8 {
        let mut b = [0u8];
        dev.read(offset, &mut b);
        b[0]
    }

    #[test]
    fn reset_command_signals_the_reset_event() {
        let (mut dev, reset, _) = setup();
        dev.write(COMMAND, &[CMD_RESET_CPU]);
        assert_eq!(reset.read().unwrap(), 1);
    }

    #[test]
    fn other_commands_and_data_do_not_reset() {
        let (mut dev, reset, _) = setup();
        dev.write(COMMAND, &[CMD_DISABLE_KBD]);
        dev.write(DATA, &[CMD_RESET_CPU]);
        assert!(reset.read().is_err());
    }

    #[test]
    fn self_test_answers_0x55_through_the_data_port() {
        let (mut dev, _, _) = setup();
        assert_eq!(inb(&mut dev, COMMAND) & STATUS_OUTPUT_FULL, 0);
        dev.write(COMMAND, &[CMD_SELF_TEST]);
        assert_ne!(inb(&mut dev, COMMAND) & STATUS_OUTPUT_FULL, 0);
        assert_eq!(inb(&mut dev, DATA), 0x55);
        assert_eq!(inb(&mut dev, COMMAND) & STATUS_OUTPUT_FULL, 0);
    }

    #[test]
    fn command_byte_round_trips() {
        let (mut dev, _, _) = setup();
        dev.write(COMMAND, &[CMD_WRITE_CONFIG]);
        dev.write(DATA, &[0x47]);
        dev.write(COMMAND, &[CMD_READ_CONFIG]);
        assert_eq!(inb(&mut dev, DATA), 0x47);
    }

    #[test]
    fn keyboard_reset_is_acknowledged_and_passes_self_test() {
        let (mut dev, _, _) = setup();
        dev.write(DATA, &[KBD_RESET]);
        assert_eq!(
            (inb(&mut dev, DATA), inb(&mut dev, DATA)),
            (KBD_ACK, KBD_SELF_TEST_OK)
        );
    }

    #[test]
    fn ctrl_alt_del_queues_the_scancodes_and_raises_irq1() {
        let (mut dev, _, irq) = setup();
        assert!(dev.send_ctrl_alt_del());
        assert!(irq.read().unwrap() >= 1);
        let bytes: Vec<u8> = (0..11).map(|_| inb(&mut dev, DATA)).collect();
        assert_eq!(&bytes[..4], &[0x14, 0x11, 0xe0, 0x71]);
        assert_eq!(inb(&mut dev, COMMAND) & STATUS_OUTPUT_FULL, 0);
    }

    #[test]
    fn full_buffer_refuses_another_sequence() {
        let (mut dev, _, _) = setup();
        assert!(dev.send_ctrl_alt_del());
        assert!(!dev.send_ctrl_alt_del());
    }

    #[test]
    fn no_interrupt_when_the_guest_disabled_it() {
        let (mut dev, _, irq) = setup();
        dev.write(COMMAND, &[CMD_WRITE_CONFIG]);
        dev.write(DATA, &[0x00]);
        dev.write(COMMAND, &[CMD_SELF_TEST]);
        assert!(irq.read().is_err());
    }
}
