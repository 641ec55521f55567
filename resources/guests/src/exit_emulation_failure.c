/* exit-emulation-failure: run an instruction the CPL0 emulator cannot handle
 * (popcnt, then xgetbv) -> KVM internal error. If either one somehow runs, or
 * raises an exception, report it and debug-exit 2. */
#include "guest.h"

const char guest_name[] = "exit-emulation-failure";

struct __attribute__((packed)) idt_gate {
    u16 off0, sel;
    u8 ist, attr;
    u16 off1;
    u32 off2, zero;
};
static struct idt_gate idt[32];

void exc_report(u64 vec)
{
    printf("emulation-failure: got exception %lu instead\n", vec);
    debug_exit(2);
}

/* one tiny stub per vector: mov $vec,%edi; jmp exc_common */
__asm__(".text\n"
        "exc_common: andq $-16, %rsp; call exc_report; 1: cli; hlt; jmp 1b\n"
        ".balign 16\nexc_stubs:\n"
        ".irp v,0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31\n"
        ".balign 16\nmovl $\\v, %edi\njmp exc_common\n"
        ".endr\n");
extern char exc_stubs[];

void guest_main(const struct bootinfo *bi)
{
    (void)bi;
    for (int v = 0; v < 32; v++) {
        u64 a = (u64)exc_stubs + 16 * v;
        idt[v] = (struct idt_gate){ (u16)a, 0x18, 0, 0x8e, (u16)(a >> 16), (u32)(a >> 32), 0 };
    }
    struct dtr d = { sizeof(idt) - 1, (u64)idt };
    __asm__ volatile("lidt %0" ::"m"(d));

    printf("emulation-failure: executing popcnt\n");
    u64 x = 0xf0f0, r;
    __asm__ volatile(".byte 0xf3, 0x48, 0x0f, 0xb8, 0xc1" /* popcnt %rcx,%rax */
                     : "=a"(r) : "c"(x));
    printf("emulation-failure: popcnt ran (result %lu); trying xgetbv\n", r);
    u32 lo, hi;
    __asm__ volatile(".byte 0x0f, 0x01, 0xd0" /* xgetbv */ : "=a"(lo), "=d"(hi) : "c"(0));
    printf("emulation-failure: xgetbv ran (0x%x%08x)\n", hi, lo);
    debug_exit(2);
}
