//! ACPI tables for a hardware-reduced machine: RSDP, XSDT, FADT (with the sleep registers Ember
//! emulates, so an ACPI poweroff ends the VM), DSDT (declaring S5) and MADT (CPUs and IOAPIC).

use acpi_tables::aml::{Name, Package, Path};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use ember_devices::acpi_sleep::{S5_SLEEP_TYPE, STATUS_OFFSET};

use super::layout::{ACPI_SLEEP_PORT, IOAPIC_START, LAPIC_START, LEGACY_END};

const OEM_ID: [u8; 6] = *b"EMBER ";
const OEM_TABLE_ID: [u8; 8] = *b"MICROVM ";
const OEM_REVISION: u32 = 1;
const TABLE_ALIGN: u64 = 16;

// IA-PC boot architecture flags (FADT): no VGA, no CMOS RTC, so the guest does not probe them.
const BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;
const BOOT_ARCH_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;

/// Errors building the ACPI tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The tables outgrew the legacy area they must live in.
    #[error("ACPI tables for {cpus} vCPUs do not fit below 1 MiB")]
    TooLarge { cpus: u8 },
}

/// One table and where it goes in guest memory.
pub struct PlacedTable {
    pub address: u64,
    pub bytes: Vec<u8>,
}

fn aml_bytes(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

/// Builds all tables for `cpus` vCPUs, laid out from `start` (where the RSDP goes).
pub fn build(start: u64, cpus: u8) -> Result<Vec<PlacedTable>, AcpiError> {
    let mut next = start + acpi_tables::rsdp::Rsdp::len() as u64;
    let mut place = |bytes: Vec<u8>| {
        let address = next.next_multiple_of(TABLE_ALIGN);
        next = address + bytes.len() as u64;
        PlacedTable { address, bytes }
    };

    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    // \_S5: SLP_TYPa, SLP_TYPb. Linux reads this to know what to write to the sleep register.
    let s5_type = S5_SLEEP_TYPE;
    Name::new(Path::new("_S5_"), &Package::new(vec![&s5_type, &s5_type])).to_aml_bytes(&mut dsdt);
    dsdt.update_checksum();
    let dsdt = place(dsdt.as_slice().to_vec());

    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .dsdt_64(dsdt.address);
    fadt.iapc_boot_arch = (BOOT_ARCH_VGA_NOT_PRESENT | BOOT_ARCH_CMOS_RTC_NOT_PRESENT).into();
    fadt.sleep_control_reg = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        ACPI_SLEEP_PORT,
    );
    fadt.sleep_status_reg = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        ACPI_SLEEP_PORT + STATUS_OFFSET,
    );
    let fadt = place(aml_bytes(&fadt.finalize()));

    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_START as u32),
    );
    for cpu in 0..cpus {
        madt.add_structure(ProcessorLocalApic::new(cpu, cpu, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(cpus, IOAPIC_START as u32, 0));
    let madt = place(aml_bytes(&madt));

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt.address);
    xsdt.add_entry(madt.address);
    let xsdt = place(aml_bytes(&xsdt));

    let rsdp = PlacedTable {
        address: start,
        bytes: aml_bytes(&Rsdp::new(OEM_ID, xsdt.address)),
    };
    if next > LEGACY_END {
        return Err(AcpiError::TooLarge { cpus });
    }
    Ok(vec![rsdp, xsdt, fadt, madt, dsdt])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(data: &[u8]) -> u8 {
        data.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    fn find<'a>(tables: &'a [PlacedTable], sig: &[u8]) -> &'a PlacedTable {
        tables.iter().find(|t| t.bytes.starts_with(sig)).unwrap()
    }

    #[test]
    fn tables_chain_and_checksum() {
        let tables = build(0xe0000, 4).unwrap();
        let rsdp = find(&tables, b"RSD PTR ");
        assert_eq!(rsdp.address, 0xe0000);
        assert_eq!(sum(&rsdp.bytes[..20]), 0);
        assert_eq!(sum(&rsdp.bytes), 0);
        let xsdt_addr = u64::from_le_bytes(rsdp.bytes[24..32].try_into().unwrap());
        let xsdt = find(&tables, b"XSDT");
        assert_eq!(xsdt.address, xsdt_addr);
        let listed: Vec<u64> = xsdt.bytes[36..]
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(
            listed,
            vec![
                find(&tables, b"FACP").address,
                find(&tables, b"APIC").address
            ]
        );
        for t in &tables[1..] {
            assert_eq!(sum(&t.bytes), 0, "{:?}", &t.bytes[..4]);
            let len = u32::from_le_bytes(t.bytes[4..8].try_into().unwrap()) as usize;
            assert_eq!(len, t.bytes.len());
            assert_eq!(t.address % TABLE_ALIGN, 0);
        }
        // Tables do not overlap.
        let mut spans: Vec<(u64, u64)> = tables
            .iter()
            .map(|t| (t.address, t.address + t.bytes.len() as u64))
            .collect();
        spans.sort();
        for w in spans.windows(2) {
            assert!(w[0].1 <= w[1].0);
        }
    }

    #[test]
    fn fadt_points_at_the_sleep_registers_and_dsdt() {
        let tables = build(0xe0000, 1).unwrap();
        let fadt = &find(&tables, b"FACP").bytes;
        let flags = u32::from_le_bytes(fadt[112..116].try_into().unwrap());
        assert_ne!(flags & (1 << 20), 0, "hardware-reduced");
        // SLEEP_CONTROL_REG at 244, SLEEP_STATUS_REG at 256: system I/O, 8 bits.
        assert_eq!(fadt[244], 1);
        assert_eq!(fadt[245], 8);
        assert_eq!(
            u64::from_le_bytes(fadt[248..256].try_into().unwrap()),
            ACPI_SLEEP_PORT
        );
        assert_eq!(
            u64::from_le_bytes(fadt[260..268].try_into().unwrap()),
            ACPI_SLEEP_PORT + 1
        );
        let x_dsdt = u64::from_le_bytes(fadt[140..148].try_into().unwrap());
        let dsdt = find(&tables, b"DSDT");
        assert_eq!(dsdt.address, x_dsdt);
        assert!(dsdt.bytes.windows(4).any(|w| w == b"_S5_"));
    }

    #[test]
    fn madt_lists_every_cpu() {
        let tables = build(0xe0000, 8).unwrap();
        let madt = &find(&tables, b"APIC").bytes;
        let mut offset = 44;
        let mut apic_ids = Vec::new();
        while offset < madt.len() {
            let (kind, len) = (madt[offset], madt[offset + 1] as usize);
            if kind == 0 {
                apic_ids.push(madt[offset + 3]);
                assert_eq!(madt[offset + 4] & 1, 1);
            }
            offset += len;
        }
        assert_eq!(apic_ids, (0..8).collect::<Vec<u8>>());
    }

    #[test]
    fn fits_for_the_largest_machine() {
        assert!(build(0xe0000, 254).is_ok());
    }
}
