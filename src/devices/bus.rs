//! An address-range bus: maps guest port or MMIO accesses to the device that owns the range.
//! Built before the vCPUs start and shared read-only between them; each device has its own lock.

use std::sync::{Arc, Mutex};

/// A device reached through register accesses. Called on a vCPU thread.
pub trait BusDevice: Send {
    /// Fills `data` with the value at `offset` from the device's base.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Handles a write of `data` at `offset` from the device's base.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A device shared between the bus and its owner.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap { base: u64, len: u64 },
    #[error("bus range at {0:#x} is empty or wraps around")]
    BadRange(u64),
}

struct Range {
    base: u64,
    len: u64,
    device: SharedDevice,
}

/// Sorted, non-overlapping ranges.
#[derive(Default)]
pub struct Bus {
    ranges: Vec<Range>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ranges: Vec<_> = self.ranges.iter().map(|r| (r.base, r.len)).collect();
        f.debug_struct("Bus").field("ranges", &ranges).finish()
    }
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `device` at `[base, base + len)`.
    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::BadRange(base))?;
        let pos = self.ranges.partition_point(|r| r.base < base);
        let overlaps_prev = pos > 0 && {
            let prev = &self.ranges[pos - 1];
            prev.base + prev.len > base
        };
        let overlaps_next = pos < self.ranges.len() && self.ranges[pos].base < end;
        if overlaps_prev || overlaps_next {
            return Err(BusError::Overlap { base, len });
        }
        self.ranges.insert(pos, Range { base, len, device });
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(&Range, u64)> {
        let pos = self.ranges.partition_point(|r| r.base <= addr);
        let range = self.ranges.get(pos.checked_sub(1)?)?;
        let offset = addr - range.base;
        // Checked: an access near the top of the address space must not wrap into the range.
        let end = offset.checked_add(u64::try_from(size).ok()?)?;
        (end <= range.len).then_some((range, offset))
    }

    /// Dispatches a read; returns false when no device owns the address.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((range, offset)) => {
                lock(&range.device).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; returns false when no device owns the address.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((range, offset)) => {
                lock(&range.device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device, recovering it if another thread panicked while holding the lock: device state
/// stays usable, and the panic itself is reported where it happened.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Recorder(Vec<(u64, Vec<u8>)>);

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset.to_le_bytes()[0]);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    fn recorder() -> Arc<Mutex<Recorder>> {
        Arc::new(Mutex::new(Recorder(Vec::new())))
    }

    #[test]
    fn access_inside_range_reaches_device_with_offset() {
        let dev = recorder();
        let mut bus = Bus::new();
        bus.insert(dev.clone(), 0x3f8, 8).unwrap();
        assert!(bus.write(0x3fb, &[7]));
        let mut data = [0u8; 1];
        assert!(bus.read(0x3fd, &mut data));
        assert_eq!(data, [5]);
        assert_eq!(dev.lock().unwrap().0, vec![(3, vec![7])]);
    }

    #[test]
    fn access_outside_every_range_is_unclaimed() {
        let mut bus = Bus::new();
        bus.insert(recorder(), 0x100, 0x10).unwrap();
        assert!(!bus.write(0x110, &[1]));
        assert!(!bus.write(0xff, &[1]));
        let mut data = [0u8; 4];
        assert!(!bus.read(0x10e, &mut data), "access straddling the end");
    }

    #[test]
    fn access_whose_end_wraps_past_the_address_space_is_unclaimed() {
        // Found by the virtio_mmio fuzz target: the end of the access overflowed.
        let dev = recorder();
        let mut bus = Bus::new();
        bus.insert(dev.clone(), 0, 0x1000).unwrap();
        let mut data = [0u8; 8];
        assert!(!bus.read(u64::MAX - 3, &mut data));
        assert!(!bus.write(u64::MAX, &[1, 2]));
        assert!(dev.lock().unwrap().0.is_empty());
    }

    #[test]
    fn overlapping_ranges_are_refused() {
        let mut bus = Bus::new();
        bus.insert(recorder(), 0x100, 0x10).unwrap();
        assert!(bus.insert(recorder(), 0x10f, 1).is_err());
        assert!(bus.insert(recorder(), 0xf8, 0x9).is_err());
        assert!(bus.insert(recorder(), 0x110, 1).is_ok());
        assert!(bus.insert(recorder(), 0xf0, 0x10).is_ok());
    }

    #[test]
    fn empty_or_wrapping_range_is_refused() {
        let mut bus = Bus::new();
        assert!(bus.insert(recorder(), 0x100, 0).is_err());
        assert!(bus.insert(recorder(), u64::MAX, 2).is_err());
    }
}
