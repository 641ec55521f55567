/* exit-status: debug-exit with the status=N given on the cmdline. */
#include "guest.h"

const char guest_name[] = "exit-status";

void guest_main(const struct bootinfo *bi)
{
    const char *v = cmdline_find(bi->cmdline, "status");
    u64 n;
    if (!v || !parse_u64(v, &n)) {
        printf("status: missing\n");
        debug_exit(1);
    }
    printf("status: %lu\n", n & 0xff);
    debug_exit((u8)n);
}
