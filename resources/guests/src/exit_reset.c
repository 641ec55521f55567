/* exit-reset: pulse the i8042 reset line; the monitor should exit 0. */
#include "guest.h"

const char guest_name[] = "exit-reset";

void guest_main(const struct bootinfo *bi)
{
    (void)bi;
    printf("reset: writing 0xfe to port 0x64\n");
    outb(0x64, 0xfe);
    for (volatile int i = 0; i < 1000; i++)
        cpu_relax();
    printf("reset: still running\n");
    debug_exit(1);
}
