/* boot-timer: two marks on the boot-timer port (0x80), then debug-exit 0. */
#include "guest.h"

const char guest_name[] = "boot-timer";

#define BOOT_TIMER_PORT 0x80

void guest_main(const struct bootinfo *bi)
{
    (void)bi;
    outb(BOOT_TIMER_PORT, 0x41);
    printf("boot-timer: marked 0x41\n");
    outb(BOOT_TIMER_PORT, 0x42);
    printf("boot-timer: marked 0x42\n");
    debug_exit(0);
}
