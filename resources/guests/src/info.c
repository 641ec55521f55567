/* pvh-info / linux64-info / bzimage-info: print what the monitor handed over.
 * Built three times; GUEST_NAME selects the name. */
#include "guest.h"

const char guest_name[] = GUEST_NAME;

void guest_main(const struct bootinfo *bi)
{
    printf("cmdline: %s\n", bi->cmdline);
    for (u32 i = 0; i < bi->nmem; i++)
        printf("mem: 0x%016lx 0x%016lx %u\n", bi->mem[i].addr, bi->mem[i].size, bi->mem[i].type);
    if (!bi->has_initrd) {
        printf("initrd: size=0 head=none\n");
    } else {
        printf("initrd: size=%lu head=", bi->initrd_size);
        if (bi->initrd_size == 0) {
            printf("none");
        } else if (bi->initrd_addr + 8 > 0x100000000UL) {
            printf("unmapped@0x%lx", bi->initrd_addr);  /* only 4 GiB is mapped */
        } else {
            const u8 *p = (const u8 *)bi->initrd_addr;
            u64 n = bi->initrd_size < 8 ? bi->initrd_size : 8;
            for (u64 i = 0; i < n; i++)
                printf("%02x", p[i]);
        }
        printf("\n");
    }
    printf("done\n");
    debug_exit(0);
}
