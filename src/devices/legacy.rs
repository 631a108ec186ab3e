//! Legacy PC devices: the 16550 UART (vm-superio) and the i8042 controller, whose reset command
//! ends the VM.

use std::io::Write;

use vm_superio::{Serial, Trigger};

use super::bus::BusDevice;
use super::EventFdTrigger;

/// Where guest serial output goes.
pub type SerialOut = Box<dyn Write + Send>;

/// Serial output through a token bucket of bytes (`serial.rate_limiter`): bytes beyond the rate
/// are dropped, as Firecracker does, and counted in `dropped`.
pub struct LimitedOut {
    inner: SerialOut,
    bucket: super::rate_limiter::TokenBucket,
    dropped: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl std::fmt::Debug for LimitedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LimitedOut")
            .field("bucket", &self.bucket)
            .finish_non_exhaustive()
    }
}

impl LimitedOut {
    /// `inner` unchanged when the bucket is unlimited (size or refill time 0).
    pub fn wrap(
        inner: SerialOut,
        config: &crate::config::TokenBucketConfig,
        dropped: std::sync::Arc<std::sync::atomic::AtomicU64>,
    ) -> SerialOut {
        match super::rate_limiter::TokenBucket::new(config, std::time::Instant::now()) {
            Some(bucket) => Box::new(LimitedOut {
                inner,
                bucket,
                dropped,
            }),
            None => inner,
        }
    }
}

impl Write for LimitedOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let len = u64::try_from(buf.len()).unwrap_or(u64::MAX);
        if self.bucket.consume(len, std::time::Instant::now()) {
            self.inner.write(buf)
        } else {
            self.dropped
                .fetch_add(len, std::sync::atomic::Ordering::Relaxed);
            Ok(buf.len())
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// The UART's registers and pending input, for snapshots.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialSnapshot {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

/// Signals the VMM when the guest has drained the receive FIFO, so more input can be queued.
#[derive(Debug)]
pub struct InputDrained(pub EventFdTrigger);

impl vm_superio::serial::SerialEvents for InputDrained {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        let _ = self.0.trigger();
    }
}

/// COM1, wired to an interrupt line and an output stream.
pub struct SerialDevice {
    inner: Serial<EventFdTrigger, InputDrained, SerialOut>,
    /// Bytes the guest wrote that could not be delivered (output stream errors).
    pub lost_bytes: u64,
}

impl std::fmt::Debug for SerialDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialDevice")
            .field("lost_bytes", &self.lost_bytes)
            .finish()
    }
}

impl SerialDevice {
    /// `drained` is signalled whenever the guest empties the receive FIFO.
    pub fn new(interrupt: EventFdTrigger, drained: EventFdTrigger, out: SerialOut) -> Self {
        let inner = Serial::with_events(interrupt, InputDrained(drained), out);
        SerialDevice {
            inner,
            lost_bytes: 0,
        }
    }

    pub fn snapshot(&self) -> SerialSnapshot {
        let s = self.inner.state();
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// A serial device continuing from `snap`.
    pub fn restored(
        snap: &SerialSnapshot,
        interrupt: EventFdTrigger,
        drained: EventFdTrigger,
        out: SerialOut,
    ) -> Result<Self, String> {
        let state = vm_superio::serial::SerialState {
            baud_divisor_low: snap.baud_divisor_low,
            baud_divisor_high: snap.baud_divisor_high,
            interrupt_enable: snap.interrupt_enable,
            interrupt_identification: snap.interrupt_identification,
            line_control: snap.line_control,
            line_status: snap.line_status,
            modem_control: snap.modem_control,
            modem_status: snap.modem_status,
            scratch: snap.scratch,
            in_buffer: snap.in_buffer.clone(),
        };
        let inner = Serial::from_state(&state, interrupt, InputDrained(drained), out)
            .map_err(|e| e.to_string())?;
        Ok(SerialDevice {
            inner,
            lost_bytes: 0,
        })
    }

    /// Queues host input for the guest; returns how many bytes fit in the receive FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let room = self.inner.fifo_capacity();
        let take = &bytes[..bytes.len().min(room)];
        if take.is_empty() {
            return 0;
        }
        self.inner.enqueue_raw_bytes(take).unwrap_or(0)
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() != 1 || offset >= 8 {
            data.fill(0);
            return;
        }
        let Ok(offset) = u8::try_from(offset) else {
            return;
        };
        data[0] = self.inner.read(offset);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() != 1 || offset >= 8 {
            return;
        }
        let Ok(offset) = u8::try_from(offset) else {
            return;
        };
        if self.inner.write(offset, data[0]).is_err() {
            self.lost_bytes += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limited_output_drops_and_counts_bytes_beyond_the_rate() {
        let sink = Sink::default();
        let dropped = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let config = crate::config::TokenBucketConfig {
            size: 10,
            refill_time: 60_000,
            one_time_burst: None,
        };
        let mut out = LimitedOut::wrap(Box::new(sink.clone()), &config, dropped.clone());
        for b in 0..25u8 {
            out.write_all(&[b]).unwrap();
        }
        assert_eq!(sink.0.lock().unwrap().len(), 10);
        assert_eq!(dropped.load(std::sync::atomic::Ordering::Relaxed), 15);
        let unlimited = crate::config::TokenBucketConfig {
            size: 0,
            refill_time: 0,
            one_time_burst: None,
        };
        let mut out = LimitedOut::wrap(Box::new(sink.clone()), &unlimited, dropped.clone());
        out.write_all(&[0; 100]).unwrap();
        assert_eq!(sink.0.lock().unwrap().len(), 110);
    }
    use std::sync::{Arc, Mutex};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn trigger() -> EventFdTrigger {
        EventFdTrigger(EventFd::new(EFD_NONBLOCK).unwrap())
    }

    #[test]
    fn bytes_written_to_thr_reach_the_output() {
        let sink = Sink::default();
        let mut serial = SerialDevice::new(trigger(), trigger(), Box::new(sink.clone()));
        for b in b"hi" {
            serial.write(0, &[*b]);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi");
    }

    #[test]
    fn input_is_readable_from_rbr_and_sets_data_ready() {
        let mut serial = SerialDevice::new(trigger(), trigger(), Box::new(Sink::default()));
        assert_eq!(serial.enqueue_input(b"x"), 1);
        let mut lsr = [0u8];
        serial.read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1);
        let mut rbr = [0u8];
        serial.read(0, &mut rbr);
        assert_eq!(rbr[0], b'x');
    }

    #[test]
    fn wide_access_is_ignored() {
        let sink = Sink::default();
        let mut serial = SerialDevice::new(trigger(), trigger(), Box::new(sink.clone()));
        serial.write(0, &[1, 2]);
        let mut data = [9u8; 2];
        serial.read(0, &mut data);
        assert!(sink.0.lock().unwrap().is_empty());
        assert_eq!(data, [0, 0]);
    }
}
