/* echo: echo COM1 input until 'Q', then report the byte count. */
#include "guest.h"

const char guest_name[] = "echo";

void guest_main(const struct bootinfo *bi)
{
    (void)bi;
    u64 count = 0;
    char last = '\n';
    printf("echo: ready\n");
    for (;;) {
        if (!(inb(COM1 + 5) & 1))   /* LSR.DR */
            continue;
        char c = (char)inb(COM1);
        if (c == 'Q')
            break;
        outb(COM1, (u8)c);
        last = c;
        count++;
    }
    if (last != '\n')
        serial_putc('\n');
    printf("echo: %lu bytes\n", count);
    debug_exit(0);
}
