/* exit-hang: never exits on its own (tests SIGTERM/SIGINT handling). */
#include "guest.h"

const char guest_name[] = "exit-hang";

void guest_main(const struct bootinfo *bi)
{
    (void)bi;
    printf("hanging\n");
    halt_forever();
}
