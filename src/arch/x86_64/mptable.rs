//! The Intel MultiProcessor Specification 1.4 table: how a guest without ACPI finds its CPUs,
//! the IOAPIC and the ISA interrupt routing.

use super::layout::{IOAPIC_PINS, IOAPIC_START, LAPIC_START};

const SPEC_REV: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;
// Family 6 signature and FPU|APIC feature flags: what Linux checks before trusting the entry.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;

const INT_VECTORED: u8 = 0;
const INT_NMI: u8 = 1;
const INT_EXTINT: u8 = 3;

const FLOATING_POINTER_LEN: usize = 16;
const HEADER_LEN: usize = 44;

/// Size of the table for `cpus` vCPUs, floating pointer included.
pub fn size(cpus: u8) -> usize {
    FLOATING_POINTER_LEN
        + HEADER_LEN
        + 20 * usize::from(cpus)
        + 8
        + 8
        + 8 * usize::from(IOAPIC_PINS)
        + 8 * 2
}

/// Builds the MP floating pointer and configuration table, to be written at `address`.
/// vCPU `i` has APIC ID `i`; the IOAPIC takes the next ID.
pub fn build(address: u32, cpus: u8) -> Vec<u8> {
    let ioapic_id = cpus;
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTSTRAP } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    count += 2;
    // ISA IRQ n is IOAPIC pin n; pin 0 is listed as the (absent) 8259's ExtINT, as on a PC.
    for pin in 0..IOAPIC_PINS {
        let kind = if pin == 0 { INT_EXTINT } else { INT_VECTORED };
        entries.extend_from_slice(&[ENTRY_IO_INTERRUPT, kind, 0, 0, 0, pin, ioapic_id, pin]);
        count += 1;
    }
    // LINT0 is the 8259's ExtINT, LINT1 the NMI line, on every local APIC (0xff).
    for (kind, lint) in [(INT_EXTINT, 0), (INT_NMI, 1)] {
        entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, kind, 0, 0, 0, 0, 0xff, lint]);
        count += 1;
    }

    let table_len = HEADER_LEN + entries.len();
    let mut table = Vec::with_capacity(table_len);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&(table_len as u16).to_le_bytes());
    table.push(SPEC_REV);
    table.push(0); // checksum, below
    table.extend_from_slice(b"EMBER   ");
    table.extend_from_slice(b"MICROVM     ");
    table.extend_from_slice(&0u32.to_le_bytes()); // no OEM table
    table.extend_from_slice(&0u16.to_le_bytes());
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&(LAPIC_START as u32).to_le_bytes());
    table.extend_from_slice(&[0; 4]); // no extended table
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut out = Vec::with_capacity(FLOATING_POINTER_LEN + table.len());
    out.extend_from_slice(b"_MP_");
    out.extend_from_slice(&(address + FLOATING_POINTER_LEN as u32).to_le_bytes());
    out.extend_from_slice(&[1, SPEC_REV, 0, 0, 0, 0, 0, 0]);
    out[10] = checksum(&out);
    out.extend_from_slice(&table);
    out
}

/// The byte that makes `data` sum to zero.
pub fn checksum(data: &[u8]) -> u8 {
    data.iter().fold(0u8, |sum, b| sum.wrapping_sub(*b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(data: &[u8]) -> u8 {
        data.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    #[test]
    fn checksums_and_lengths_hold() {
        for cpus in [1u8, 2, 8, 254] {
            let mp = build(0x9fc00, cpus);
            assert_eq!(mp.len(), size(cpus));
            assert_eq!(&mp[..4], b"_MP_");
            assert_eq!(sum(&mp[..16]), 0);
            assert_eq!(u32::from_le_bytes(mp[4..8].try_into().unwrap()), 0x9fc10);
            let table = &mp[16..];
            assert_eq!(&table[..4], b"PCMP");
            assert_eq!(
                usize::from(u16::from_le_bytes([table[4], table[5]])),
                table.len()
            );
            assert_eq!(sum(table), 0);
        }
    }

    #[test]
    fn lists_every_cpu_with_the_bsp_first() {
        let mp = build(0x9fc00, 3);
        let entries = &mp[16 + HEADER_LEN..];
        let count = u16::from_le_bytes([mp[16 + 34], mp[16 + 35]]);
        assert_eq!(count, 3 + 2 + u16::from(IOAPIC_PINS) + 2);
        for cpu in 0..3usize {
            let e = &entries[cpu * 20..];
            assert_eq!(e[0], ENTRY_PROCESSOR);
            assert_eq!(e[1], cpu as u8);
            assert_eq!(e[3] & CPU_ENABLED, CPU_ENABLED);
            assert_eq!(e[3] & CPU_BOOTSTRAP != 0, cpu == 0);
        }
        let ioapic = &entries[60 + 8..];
        assert_eq!(ioapic[0], ENTRY_IOAPIC);
        assert_eq!(ioapic[1], 3);
    }
}
