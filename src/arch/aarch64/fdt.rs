//! The flattened device tree the guest boots with: memory, CPUs (PSCI), the GICv3, the
//! architected timer, the serial port, the RTC, the virtio-mmio devices and `/chosen`.

use vm_fdt::{Error as FdtError, FdtWriter};

use super::layout::{
    gic_its_start, gic_redist_size, gic_redist_start, mpidr, GIC_DIST_SIZE, GIC_DIST_START,
    GIC_ITS_SIZE, MMIO_SLOT_SIZE, RTC_SPI, RTC_START, SERIAL_SPI, SERIAL_START,
};
use super::vcpu::PMU_PPI;
use crate::arch::DeviceSlot;

const GIC_PHANDLE: u32 = 1;
const ITS_PHANDLE: u32 = 3;
const CLOCK_PHANDLE: u32 = 2;
/// Interrupt specifier types (first cell).
const GIC_SPI: u32 = 0;
const GIC_PPI: u32 = 1;
/// Trigger flags (third cell).
const IRQ_EDGE_RISING: u32 = 1;
const IRQ_LEVEL_HIGH: u32 = 4;
/// PPIs of the architected timer: secure and non-secure physical, virtual, hypervisor.
const TIMER_PPIS: [u32; 4] = [13, 14, 11, 10];
/// The GIC maintenance interrupt (PPI).
const GIC_MAINTENANCE_PPI: u32 = 9;
/// The reference clock the serial port and the RTC name.
const CLOCK_HZ: u32 = 24_000_000;

/// What goes into the device tree.
#[derive(Debug)]
pub struct FdtConfig<'a> {
    pub ram: &'a [(u64, u64)],
    pub vcpus: u8,
    pub cmdline: &'a str,
    /// The initrd's `(start, size)` in guest memory.
    pub initrd: Option<(u64, u64)>,
    pub devices: &'a [DeviceSlot],
    /// Seeds the guest's random number generator (`/chosen/rng-seed`).
    pub rng_seed: [u8; 32],
    /// The vCPUs have a PMU (`/pmu`).
    pub pmu: bool,
    /// The GIC has an ITS (an `msi-controller` child of the GIC's node).
    pub its: bool,
}

/// Builds the device tree blob.
pub fn build(config: &FdtConfig<'_>) -> Result<Vec<u8>, FdtError> {
    let mut fdt = FdtWriter::new()?;
    let root = fdt.begin_node("")?;
    fdt.property_string("compatible", "linux,dummy-virt")?;
    fdt.property_u32("#address-cells", 2)?;
    fdt.property_u32("#size-cells", 2)?;
    fdt.property_u32("interrupt-parent", GIC_PHANDLE)?;

    cpus(&mut fdt, config.vcpus)?;
    memory(&mut fdt, config.ram)?;
    chosen(&mut fdt, config)?;
    gic(&mut fdt, config.vcpus, config.its)?;
    timer(&mut fdt)?;
    if config.pmu {
        pmu(&mut fdt)?;
    }
    psci(&mut fdt)?;
    clock(&mut fdt)?;
    serial(&mut fdt)?;
    rtc(&mut fdt)?;
    for slot in config.devices {
        virtio_mmio(&mut fdt, slot)?;
    }

    fdt.end_node(root)?;
    fdt.finish()
}

fn cpus(fdt: &mut FdtWriter, vcpus: u8) -> Result<(), FdtError> {
    let node = fdt.begin_node("cpus")?;
    fdt.property_u32("#address-cells", 2)?;
    fdt.property_u32("#size-cells", 0)?;
    for index in 0..vcpus {
        let id = mpidr(index);
        let cpu = fdt.begin_node(&format!("cpu@{id:x}"))?;
        fdt.property_string("device_type", "cpu")?;
        fdt.property_string("compatible", "arm,arm-v8")?;
        fdt.property_string("enable-method", "psci")?;
        fdt.property_u64("reg", id)?;
        fdt.end_node(cpu)?;
    }
    fdt.end_node(node)
}

fn memory(fdt: &mut FdtWriter, ram: &[(u64, u64)]) -> Result<(), FdtError> {
    let start = ram.first().map_or(0, |r| r.0);
    let node = fdt.begin_node(&format!("memory@{start:x}"))?;
    fdt.property_string("device_type", "memory")?;
    let cells: Vec<u64> = ram.iter().flat_map(|&(s, l)| [s, l]).collect();
    fdt.property_array_u64("reg", &cells)?;
    fdt.end_node(node)
}

fn chosen(fdt: &mut FdtWriter, config: &FdtConfig<'_>) -> Result<(), FdtError> {
    let node = fdt.begin_node("chosen")?;
    fdt.property_string("bootargs", config.cmdline)?;
    fdt.property_string("stdout-path", &format!("/uart@{SERIAL_START:x}"))?;
    if let Some((start, size)) = config.initrd {
        fdt.property_u64("linux,initrd-start", start)?;
        fdt.property_u64("linux,initrd-end", start + size)?;
    }
    fdt.property("rng-seed", &config.rng_seed)?;
    fdt.end_node(node)
}

fn gic(fdt: &mut FdtWriter, vcpus: u8, its: bool) -> Result<(), FdtError> {
    let node = fdt.begin_node(&format!("intc@{GIC_DIST_START:x}"))?;
    fdt.property_string("compatible", "arm,gic-v3")?;
    fdt.property_null("interrupt-controller")?;
    fdt.property_u32("#interrupt-cells", 3)?;
    fdt.property_u32("#address-cells", 2)?;
    fdt.property_u32("#size-cells", 2)?;
    fdt.property_null("ranges")?;
    fdt.property_array_u64(
        "reg",
        &[
            GIC_DIST_START,
            GIC_DIST_SIZE,
            gic_redist_start(vcpus),
            gic_redist_size(vcpus),
        ],
    )?;
    fdt.property_array_u32(
        "interrupts",
        &[GIC_PPI, GIC_MAINTENANCE_PPI, IRQ_LEVEL_HIGH],
    )?;
    fdt.property_phandle(GIC_PHANDLE)?;
    if its {
        let start = gic_its_start(vcpus);
        let its = fdt.begin_node(&format!("msi-controller@{start:x}"))?;
        fdt.property_string("compatible", "arm,gic-v3-its")?;
        fdt.property_null("msi-controller")?;
        fdt.property_u32("#msi-cells", 1)?;
        fdt.property_array_u64("reg", &[start, GIC_ITS_SIZE])?;
        fdt.property_phandle(ITS_PHANDLE)?;
        fdt.end_node(its)?;
    }
    fdt.end_node(node)
}

fn timer(fdt: &mut FdtWriter) -> Result<(), FdtError> {
    let node = fdt.begin_node("timer")?;
    fdt.property_string("compatible", "arm,armv8-timer")?;
    fdt.property_null("always-on")?;
    let cells: Vec<u32> = TIMER_PPIS
        .iter()
        .flat_map(|&ppi| [GIC_PPI, ppi, IRQ_LEVEL_HIGH])
        .collect();
    fdt.property_array_u32("interrupts", &cells)?;
    fdt.end_node(node)
}

fn pmu(fdt: &mut FdtWriter) -> Result<(), FdtError> {
    let node = fdt.begin_node("pmu")?;
    fdt.property_string("compatible", "arm,armv8-pmuv3")?;
    fdt.property_array_u32("interrupts", &[GIC_PPI, PMU_PPI, IRQ_LEVEL_HIGH])?;
    fdt.end_node(node)
}

fn psci(fdt: &mut FdtWriter) -> Result<(), FdtError> {
    let node = fdt.begin_node("psci")?;
    fdt.property_string_list(
        "compatible",
        vec!["arm,psci-0.2".to_string(), "arm,psci".to_string()],
    )?;
    fdt.property_string("method", "hvc")?;
    fdt.end_node(node)
}

fn clock(fdt: &mut FdtWriter) -> Result<(), FdtError> {
    let node = fdt.begin_node("apb-pclk")?;
    fdt.property_string("compatible", "fixed-clock")?;
    fdt.property_u32("#clock-cells", 0)?;
    fdt.property_u32("clock-frequency", CLOCK_HZ)?;
    fdt.property_string("clock-output-names", "clk24mhz")?;
    fdt.property_phandle(CLOCK_PHANDLE)?;
    fdt.end_node(node)
}

fn serial(fdt: &mut FdtWriter) -> Result<(), FdtError> {
    let node = fdt.begin_node(&format!("uart@{SERIAL_START:x}"))?;
    fdt.property_string("compatible", "ns16550a")?;
    fdt.property_array_u64("reg", &[SERIAL_START, MMIO_SLOT_SIZE])?;
    fdt.property_u32("clock-frequency", CLOCK_HZ)?;
    fdt.property_array_u32("interrupts", &[GIC_SPI, SERIAL_SPI, IRQ_EDGE_RISING])?;
    fdt.end_node(node)
}

fn rtc(fdt: &mut FdtWriter) -> Result<(), FdtError> {
    let node = fdt.begin_node(&format!("rtc@{RTC_START:x}"))?;
    fdt.property_string_list(
        "compatible",
        vec!["arm,pl031".to_string(), "arm,primecell".to_string()],
    )?;
    fdt.property_array_u64("reg", &[RTC_START, MMIO_SLOT_SIZE])?;
    fdt.property_array_u32("interrupts", &[GIC_SPI, RTC_SPI, IRQ_LEVEL_HIGH])?;
    fdt.property_u32("clocks", CLOCK_PHANDLE)?;
    fdt.property_string("clock-names", "apb_pclk")?;
    fdt.end_node(node)
}

fn virtio_mmio(fdt: &mut FdtWriter, slot: &DeviceSlot) -> Result<(), FdtError> {
    let node = fdt.begin_node(&format!("virtio_mmio@{:x}", slot.base))?;
    fdt.property_string("compatible", "virtio,mmio")?;
    fdt.property_array_u64("reg", &[slot.base, slot.size])?;
    fdt.property_array_u32("interrupts", &[GIC_SPI, slot.irq, IRQ_EDGE_RISING])?;
    fdt.property_null("dma-coherent")?;
    fdt.end_node(node)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::aarch64::layout;

    fn sample() -> Vec<u8> {
        sample_with(false, false)
    }

    fn sample_with(pmu: bool, its: bool) -> Vec<u8> {
        let ram = layout::ram_ranges(128 << 20);
        let devices = [layout::device_slot(0).unwrap()];
        build(&FdtConfig {
            ram: &ram,
            vcpus: 2,
            cmdline: "console=ttyS0 tg.count=1",
            initrd: Some((0x8800_0000, 0x1000)),
            devices: &devices,
            rng_seed: [7; 32],
            pmu,
            its,
        })
        .unwrap()
    }

    #[test]
    fn the_pmu_node_is_there_only_with_a_pmu() {
        assert!(!contains(&sample(), b"arm,armv8-pmuv3\0"));
        let blob = sample_with(true, false);
        assert!(contains(&blob, b"pmu\0"));
        assert!(contains(&blob, b"arm,armv8-pmuv3\0"));
        // interrupts = <GIC_PPI 7 IRQ_TYPE_LEVEL_HIGH>, big-endian cells.
        assert!(contains(&blob, &[0, 0, 0, 1, 0, 0, 0, 7, 0, 0, 0, 4]));
    }

    #[test]
    fn the_its_node_is_there_only_with_an_its() {
        assert!(!contains(&sample(), b"arm,gic-v3-its\0"));
        let blob = sample_with(false, true);
        assert!(contains(&blob, b"arm,gic-v3-its\0"));
        // Two vCPUs: redistributors at 0x3ffb_0000, the ITS's 128 KiB below them.
        assert!(contains(&blob, b"msi-controller@3ff90000\0"));
        let reg = [0x3ff9_0000u64, 0x2_0000]
            .iter()
            .flat_map(|v| v.to_be_bytes())
            .collect::<Vec<u8>>();
        assert!(contains(&blob, &reg));
    }

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn blob_has_header_and_the_nodes_a_guest_needs() {
        let blob = sample();
        assert_eq!(&blob[..4], &[0xd0, 0x0d, 0xfe, 0xed]);
        let total = u32::from_be_bytes(blob[4..8].try_into().unwrap());
        assert_eq!(total as usize, blob.len());
        for name in [
            &b"cpu@0\0"[..],
            b"cpu@1\0",
            b"memory@80000000\0",
            b"intc@3fff0000\0",
            b"uart@40002000\0",
            b"rtc@40001000\0",
            b"virtio_mmio@40003000\0",
            b"arm,psci-0.2\0",
            b"console=ttyS0 tg.count=1\0",
        ] {
            assert!(contains(&blob, name), "{}", String::from_utf8_lossy(name));
        }
    }
}
