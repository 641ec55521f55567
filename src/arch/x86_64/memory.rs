//! Guest RAM: how the requested size splits around the 32-bit MMIO hole, and the memory map
//! (e820 / PVH) the guest is told, which describes exactly those KVM memory slots.

use super::layout::{EBDA_START, HIMEM_START, LEGACY_END, MMIO_HOLE_END, MMIO_HOLE_START};

/// Smallest RAM Ember accepts: the boot structures below 1 MiB plus room for a small kernel.
pub const MIN_RAM_BYTES: u64 = 2 << 20;

/// A contiguous piece of guest RAM, one KVM memory slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamRegion {
    pub start: u64,
    pub size: u64,
}

impl RamRegion {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.start + self.size
    }
}

/// Splits `size` bytes of RAM into the region below the MMIO hole and, if needed, one above it.
pub fn ram_regions(size: u64) -> Vec<RamRegion> {
    let low = size.min(MMIO_HOLE_START);
    let mut regions = vec![RamRegion {
        start: 0,
        size: low,
    }];
    if size > low {
        regions.push(RamRegion {
            start: MMIO_HOLE_END,
            size: size - low,
        });
    }
    regions
}

/// e820 entry types (ACPI address range types).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum MemoryType {
    Ram = 1,
    Reserved = 2,
}

/// One entry of the memory map the guest sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryMapEntry {
    pub start: u64,
    pub size: u64,
    pub kind: MemoryType,
}

/// The memory map for `regions`: every byte of every slot, nothing else. The legacy area between
/// the EBDA and 1 MiB (MP table, ACPI tables) is reported reserved so the guest leaves it alone.
pub fn memory_map(regions: &[RamRegion]) -> Vec<MemoryMapEntry> {
    let mut map = Vec::new();
    for region in regions {
        if region.start == 0 {
            let ram_below_ebda = region.size.min(EBDA_START);
            map.push(MemoryMapEntry {
                start: 0,
                size: ram_below_ebda,
                kind: MemoryType::Ram,
            });
            if region.size > EBDA_START {
                let legacy_end = region.size.min(LEGACY_END);
                map.push(MemoryMapEntry {
                    start: EBDA_START,
                    size: legacy_end - EBDA_START,
                    kind: MemoryType::Reserved,
                });
            }
            if region.size > HIMEM_START {
                map.push(MemoryMapEntry {
                    start: HIMEM_START,
                    size: region.size - HIMEM_START,
                    kind: MemoryType::Ram,
                });
            }
        } else {
            map.push(MemoryMapEntry {
                start: region.start,
                size: region.size,
                kind: MemoryType::Ram,
            });
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    #[test]
    fn small_ram_is_one_region() {
        assert_eq!(
            ram_regions(64 * MIB),
            vec![RamRegion {
                start: 0,
                size: 64 * MIB
            }]
        );
        assert_eq!(ram_regions(3 * GIB).len(), 1);
    }

    #[test]
    fn large_ram_splits_around_the_hole() {
        let regions = ram_regions(3 * GIB + 512 * MIB);
        assert_eq!(
            regions,
            vec![
                RamRegion {
                    start: 0,
                    size: 3 * GIB
                },
                RamRegion {
                    start: 4 * GIB,
                    size: 512 * MIB
                }
            ]
        );
        let total: u64 = regions.iter().map(|r| r.size).sum();
        assert_eq!(total, 3 * GIB + 512 * MIB);
    }

    #[test]
    fn memory_map_covers_exactly_the_slots() {
        for size in [2 * MIB, 64 * MIB, 3 * GIB, 5 * GIB] {
            let regions = ram_regions(size);
            let map = memory_map(&regions);
            // Entries are sorted, disjoint and contiguous inside each slot.
            for pair in map.windows(2) {
                assert!(pair[0].start + pair[0].size <= pair[1].start);
            }
            let covered: u64 = map.iter().map(|e| e.size).sum();
            assert_eq!(covered, size, "size {size:#x}");
            for entry in &map {
                assert!(regions
                    .iter()
                    .any(|r| entry.start >= r.start && entry.start + entry.size <= r.end()));
            }
        }
    }

    #[test]
    fn memory_map_layout_for_5g() {
        let map = memory_map(&ram_regions(5 * GIB));
        assert_eq!(
            map,
            vec![
                MemoryMapEntry {
                    start: 0,
                    size: EBDA_START,
                    kind: MemoryType::Ram
                },
                MemoryMapEntry {
                    start: EBDA_START,
                    size: LEGACY_END - EBDA_START,
                    kind: MemoryType::Reserved
                },
                MemoryMapEntry {
                    start: HIMEM_START,
                    size: 3 * GIB - HIMEM_START,
                    kind: MemoryType::Ram
                },
                MemoryMapEntry {
                    start: 4 * GIB,
                    size: 2 * GIB,
                    kind: MemoryType::Ram
                },
            ]
        );
    }
}
