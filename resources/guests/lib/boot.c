/* Turns the monitor's boot structures into a struct bootinfo. Called from
 * the entry stubs in 64-bit mode with the first 4 GiB identity-mapped. */
#include "guest.h"

static struct bootinfo bi;

static void banner(void)
{
    puts_raw("ember-guest: ");
    puts_raw(guest_name);
    puts_raw("\n");
}

/* ---- PVH: struct hvm_start_info (xen/include/public/arch-x86/hvm/start_info.h) ---- */
#define HVM_START_MAGIC 0x336ec578
struct hvm_start_info {
    u32 magic, version, flags, nr_modules;
    u64 modlist_paddr, cmdline_paddr, rsdp_paddr;
    u64 memmap_paddr;           /* version >= 1 */
    u32 memmap_entries, reserved;
};
struct hvm_modlist_entry { u64 paddr, size, cmdline_paddr, reserved; };
struct hvm_memmap_table_entry { u64 addr, size; u32 type, reserved; };

noreturn pvh_main(u32 start_info)
{
    banner();
    const struct hvm_start_info *si = (const void *)(u64)start_info;
    bi.proto = BOOT_PVH;
    bi.raw = start_info;
    if (si->magic != HVM_START_MAGIC) {
        printf("error: bad hvm_start_info magic 0x%x at 0x%x\n", si->magic, start_info);
        debug_exit(2);
    }
    bi.cmdline = si->cmdline_paddr ? (const char *)si->cmdline_paddr : "";
    if (si->version >= 1 && si->memmap_paddr) {
        const struct hvm_memmap_table_entry *e = (const void *)si->memmap_paddr;
        for (u32 i = 0; i < si->memmap_entries && bi.nmem < MAX_MEM; i++) {
            bi.mem[bi.nmem].addr = e[i].addr;
            bi.mem[bi.nmem].size = e[i].size;
            bi.mem[bi.nmem].type = e[i].type;
            bi.nmem++;
        }
    }
    if (si->nr_modules && si->modlist_paddr) {
        const struct hvm_modlist_entry *m = (const void *)si->modlist_paddr;
        bi.has_initrd = 1;
        bi.initrd_addr = m[0].paddr;
        bi.initrd_size = m[0].size;
    }
    guest_main(&bi);
    debug_exit(0);
}

/* ---- Linux 64-bit boot protocol: struct boot_params ("zero page") ---- */
#define BP_EXT_RAMDISK_IMAGE 0x0c0
#define BP_EXT_RAMDISK_SIZE 0x0c4
#define BP_EXT_CMD_LINE_PTR 0x0c8
#define BP_E820_ENTRIES 0x1e8
#define BP_RAMDISK_IMAGE 0x218
#define BP_RAMDISK_SIZE 0x21c
#define BP_CMD_LINE_PTR 0x228
#define BP_E820_TABLE 0x2d0
#define BP_E820_MAX 128

struct __attribute__((packed)) e820_entry { u64 addr, size; u32 type; };

noreturn linux64_main(u64 boot_params)
{
    banner();
    const u8 *bp = (const u8 *)boot_params;
    bi.proto = BOOT_LINUX64;
    bi.raw = boot_params;

    u64 cmd = *(const u32 *)(bp + BP_CMD_LINE_PTR) |
              (u64)*(const u32 *)(bp + BP_EXT_CMD_LINE_PTR) << 32;
    bi.cmdline = cmd ? (const char *)cmd : "";

    u32 n = bp[BP_E820_ENTRIES];
    if (n > BP_E820_MAX)
        n = BP_E820_MAX;
    const struct e820_entry *e = (const void *)(bp + BP_E820_TABLE);
    for (u32 i = 0; i < n && bi.nmem < MAX_MEM; i++) {
        bi.mem[bi.nmem].addr = e[i].addr;
        bi.mem[bi.nmem].size = e[i].size;
        bi.mem[bi.nmem].type = e[i].type;
        bi.nmem++;
    }

    u64 rd = *(const u32 *)(bp + BP_RAMDISK_IMAGE) |
             (u64)*(const u32 *)(bp + BP_EXT_RAMDISK_IMAGE) << 32;
    u64 rs = *(const u32 *)(bp + BP_RAMDISK_SIZE) |
             (u64)*(const u32 *)(bp + BP_EXT_RAMDISK_SIZE) << 32;
    if (rs) {
        bi.has_initrd = 1;
        bi.initrd_addr = rd;
        bi.initrd_size = rs;
    }
    guest_main(&bi);
    debug_exit(0);
}
