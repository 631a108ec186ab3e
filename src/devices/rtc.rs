//! The Arm PL031 real-time clock (vm-superio) on MMIO: the guest reads the host's wall-clock
//! time from it. 32-bit registers only; other access sizes read as zero and are ignored.

use vm_superio::Rtc;

use super::bus::BusDevice;

/// The PL031 on the MMIO bus.
#[derive(Default)]
pub struct RtcDevice {
    inner: Rtc<vm_superio::rtc_pl031::NoEvents>,
}

impl std::fmt::Debug for RtcDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RtcDevice").finish_non_exhaustive()
    }
}

impl RtcDevice {
    pub fn new() -> Self {
        RtcDevice { inner: Rtc::new() }
    }
}

impl BusDevice for RtcDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u16::try_from(offset), <&mut [u8; 4]>::try_from(&mut *data)) {
            (Ok(offset), Ok(word)) => self.inner.read(offset, word),
            _ => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(offset), Ok(word)) = (u16::try_from(offset), <&[u8; 4]>::try_from(data)) {
            self.inner.write(offset, word);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_primecell_id_and_a_running_clock() {
        let mut rtc = RtcDevice::new();
        let mut word = [0u8; 4];
        // PrimeCell id register 0 (offset 0xff0) reads 0x0d.
        rtc.read(0xff0, &mut word);
        assert_eq!(word, [0x0d, 0, 0, 0]);
        rtc.read(0, &mut word);
        assert!(u32::from_le_bytes(word) > 1_600_000_000);
        let mut short = [0xffu8; 2];
        rtc.read(0, &mut short);
        assert_eq!(short, [0, 0]);
    }
}
