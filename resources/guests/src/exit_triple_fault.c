/* exit-triple-fault: empty IDT + #UD -> #GP -> #DF -> triple fault
 * (KVM_EXIT_SHUTDOWN). Uses ud2, not int3/int n (not emulatable here). */
#include "guest.h"

const char guest_name[] = "exit-triple-fault";

void guest_main(const struct bootinfo *bi)
{
    (void)bi;
    static struct dtr idt = { 0, 0 };
    printf("triple-fault: loading empty IDT and executing ud2\n");
    __asm__ volatile("lidt %0; ud2" ::"m"(idt));
    printf("triple-fault: still running\n");
    debug_exit(1);
}
