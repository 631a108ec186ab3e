//! Intel MultiProcessor Specification 1.4 table: tells the guest how many CPUs it has, where the
//! IO-APIC is and how legacy IRQs are wired. Pure data; the result is written at the EBDA.
//!
//! Narrowing casts here are exact: table fields are sized by the MP specification and filled from constants and a vCPU count of at most 32.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap
)]

use super::layout::{APIC_START, IOAPIC_START, LAST_DEVICE_IRQ};

const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const FLOATING_POINTER_LEN: usize = 16;
const HEADER_LEN: usize = 44;
/// CPUID signature and feature flags reported per CPU (family 6; FPU and APIC present).
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = 0x201;

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |acc, b| acc.wrapping_sub(*b))
}

/// Builds the floating pointer followed by the configuration table, for `num_cpus` CPUs with APIC
/// ids `0..num_cpus`, to be placed at guest-physical `base` (16-byte aligned).
pub fn build(num_cpus: u8, base: u64) -> Vec<u8> {
    let ioapic_id = num_cpus; // first id after the CPUs
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..num_cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTSTRAP } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0, b'I', b'S', b'A', b' ', b' ', b' ']);
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    count += 1;
    // KVM's default routing sends GSI n to IO-APIC pin n, IRQ 0 (the PIT) included: every line,
    // the timer too, is an ordinary vectored interrupt on its own pin. (An ExtINT entry for pin 0
    // leaves IRQ 0 without an IO-APIC mapping, and Linux's check_timer() then crashes on guests
    // that fall back to the PIT, as AMD guests without the TSC-deadline timer do.)
    for irq in 0..=LAST_DEVICE_IRQ as u8 {
        entries.extend_from_slice(&[
            ENTRY_IO_INTERRUPT,
            INT_TYPE_INT,
            0,
            0,
            0,
            irq,
            ioapic_id,
            irq,
        ]);
        count += 1;
    }
    // The 8259 PIC reaches the CPUs through LINT0 (ExtINT); NMI goes to LINT1, on every local APIC.
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_len = HEADER_LEN + entries.len();
    let mut header = Vec::with_capacity(HEADER_LEN);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&(table_len as u16).to_le_bytes());
    header.push(4); // spec revision 1.4
    header.push(0); // checksum, below
    header.extend_from_slice(b"FLICK   ");
    header.extend_from_slice(b"MICROVM     ");
    header.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    header.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    header.extend_from_slice(&count.to_le_bytes());
    header.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    header.extend_from_slice(&[0, 0, 0, 0]); // extended table length, checksum, reserved
    let mut table = header;
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let table_addr = base + FLOATING_POINTER_LEN as u64;
    let mut out = Vec::with_capacity(FLOATING_POINTER_LEN + table.len());
    out.extend_from_slice(b"_MP_");
    out.extend_from_slice(&(table_addr as u32).to_le_bytes());
    out.push(1); // length in 16-byte units
    out.push(4); // spec revision
    out.push(0); // checksum, below
    out.extend_from_slice(&[0; 5]); // features: a configuration table is present
    out[10] = checksum(&out[..FLOATING_POINTER_LEN]);
    out.extend_from_slice(&table);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    #[test]
    fn checksums_make_both_structures_sum_to_zero() {
        let blob = build(4, 0x9fc00);
        assert_eq!(sum(&blob[..16]), 0);
        assert_eq!(sum(&blob[16..]), 0);
    }

    #[test]
    fn one_processor_entry_per_cpu_with_bsp_flag_on_first() {
        let blob = build(3, 0x9fc00);
        let table = &blob[16..];
        let first = &table[HEADER_LEN..HEADER_LEN + 20];
        assert_eq!(first[0], ENTRY_PROCESSOR);
        assert_eq!(first[3], CPU_ENABLED | CPU_BOOTSTRAP);
        let third = &table[HEADER_LEN + 40..HEADER_LEN + 60];
        assert_eq!((third[1], third[3]), (2, CPU_ENABLED));
        assert_eq!(table[HEADER_LEN + 60], ENTRY_BUS);
    }

    #[test]
    fn floating_pointer_points_at_table() {
        let blob = build(1, 0x9fc00);
        assert_eq!(&blob[0..4], b"_MP_");
        assert_eq!(u32::from_le_bytes(blob[4..8].try_into().unwrap()), 0x9fc10);
        assert_eq!(&blob[16..20], b"PCMP");
    }

    /// The 8-byte entries after the processor entries: (type, bytes).
    fn short_entries(blob: &[u8], num_cpus: usize) -> Vec<[u8; 8]> {
        let table = &blob[16..];
        let len = u16::from_le_bytes([table[4], table[5]]) as usize;
        table[HEADER_LEN + 20 * num_cpus..len]
            .chunks(8)
            .map(|c| c.try_into().unwrap())
            .collect()
    }

    #[test]
    fn every_irq_including_the_timer_is_an_int_on_the_pin_of_the_same_number() {
        let blob = build(2, 0x9fc00);
        let io: Vec<_> = short_entries(&blob, 2)
            .into_iter()
            .filter(|e| e[0] == ENTRY_IO_INTERRUPT)
            .collect();
        assert_eq!(io.len(), LAST_DEVICE_IRQ as usize + 1);
        for (n, e) in io.iter().enumerate() {
            // type INT, default polarity/trigger, ISA bus 0, source IRQ n -> IO-APIC (id 2) pin n
            assert_eq!(
                e,
                &[
                    ENTRY_IO_INTERRUPT,
                    INT_TYPE_INT,
                    0,
                    0,
                    0,
                    n as u8,
                    2,
                    n as u8
                ]
            );
        }
    }

    #[test]
    fn pic_is_extint_on_lint0_and_nmi_on_lint1() {
        let blob = build(1, 0x9fc00);
        let local: Vec<_> = short_entries(&blob, 1)
            .into_iter()
            .filter(|e| e[0] == ENTRY_LOCAL_INTERRUPT)
            .collect();
        assert_eq!(local.len(), 2);
        assert_eq!(
            (local[0][1], local[0][6], local[0][7]),
            (INT_TYPE_EXTINT, 0xff, 0)
        );
        assert_eq!(
            (local[1][1], local[1][6], local[1][7]),
            (INT_TYPE_NMI, 0xff, 1)
        );
    }

    #[test]
    fn entry_count_matches_the_entries() {
        let blob = build(3, 0x9fc00);
        let table = &blob[16..];
        let count = u16::from_le_bytes([table[34], table[35]]) as usize;
        assert_eq!(count, 3 + short_entries(&blob, 3).len());
    }

    #[test]
    fn table_for_32_cpus_fits_in_the_ebda() {
        assert!(build(32, 0x9fc00).len() <= 1024);
    }
}
