/* smp: find the MP table, start every AP with INIT/SIPI/SIPI, count them. */
#include "guest.h"

const char guest_name[] = "smp";

#define MAX_CPUS 64
#define LAPIC 0xfee00000UL
#define LAPIC_ID 0x020
#define LAPIC_SVR 0x0f0
#define LAPIC_ESR 0x280
#define LAPIC_ICR_LO 0x300
#define LAPIC_ICR_HI 0x310
#define TRAMP_BASE 0x8000

/* used by arch/ap_trampoline.S; AP_STACK_SIZE is passed as -D to both */
#define STACK_SIZE AP_STACK_SIZE
static u8 ap_stacks[MAX_CPUS][STACK_SIZE] __attribute__((aligned(16), noinit));
volatile u64 ap_next_stack;
volatile u32 ap_stack_lock;
extern const char ap_trampoline_start[], ap_trampoline_end[];

static volatile u32 print_lock;
static volatile u32 cpus_up;

static void lock(volatile u32 *l)
{
    u32 v;
    do {
        v = 1;
        __asm__ volatile("xchgl %0, %1" : "+r"(v), "+m"(*l) :: "memory");
    } while (v);
}
static void unlock(volatile u32 *l)
{
    __asm__ volatile("" ::: "memory");
    *l = 0;
}

static u32 lapic_read(u32 reg) { return mmio_read32(LAPIC + reg); }
static void lapic_write(u32 reg, u32 v) { mmio_write32(LAPIC + reg, v); }
static u32 my_apic_id(void) { return lapic_read(LAPIC_ID) >> 24; }

static void report_up(void)
{
    u32 id = my_apic_id();
    lock(&print_lock);
    printf("cpu %u up\n", id);
    cpus_up++;
    unlock(&print_lock);
}

void ap_main(void)
{
    report_up();
    halt_forever();
}

static u8 sum(const u8 *p, u32 n)
{
    u8 s = 0;
    while (n--)
        s += *p++;
    return s;
}

static const u8 *find_mpf(u64 start, u64 end)
{
    for (u64 a = start; a + 16 <= end; a += 16) {
        const u8 *p = (const u8 *)a;
        if (memcmp(p, "_MP_", 4) == 0 && p[8] == 1 && sum(p, 16) == 0)
            return p;
    }
    return NULL;
}

static noreturn fail(const char *why)
{
    printf("smp: %s\n", why);
    debug_exit(2);
}

static int icr_wait(void)
{
    for (int i = 0; i < 1000; i++)
        if (!(lapic_read(LAPIC_ICR_LO) & (1u << 12)))   /* delivery status */
            return 1;
    return 0;
}

static void send_ipi(u32 apic, u32 lo)
{
    lapic_write(LAPIC_ICR_HI, apic << 24);
    lapic_write(LAPIC_ICR_LO, lo);
    if (!icr_wait())
        printf("smp: ICR stuck for apic %u (0x%x)\n", apic, lo);
}

void guest_main(const struct bootinfo *bi)
{
    u32 ids[MAX_CPUS], n = 0;
    u64 forced;
    const char *f = cmdline_find(bi->cmdline, "smp.cpus");
    if (f && parse_u64(f, &forced)) {
        /* Testing aid for VMMs without a usable MP table: APIC IDs 0..N-1. */
        for (n = 0; n < forced && n < MAX_CPUS; n++)
            ids[n] = n;
        printf("mp: cpus=%u (from cmdline smp.cpus)\n", n);
        goto start;
    }

    /* MP floating pointer: the monitor puts it at 0x9fc00; also look in the
     * BIOS area as the MP spec allows (for testing under other VMMs). */
    const u8 *mpf = find_mpf(0x9fc00, 0xa0000);
    if (!mpf)
        mpf = find_mpf(0xf0000, 0x100000);
    if (!mpf)
        fail("no MP floating pointer");
    u64 cfg = *(const u32 *)(mpf + 4);
    if (!cfg)
        fail("MP floating pointer has no config table (default configs unsupported)");
    const u8 *t = (const u8 *)cfg;
    u16 len = *(const u16 *)(t + 4);
    if (memcmp(t, "PCMP", 4) != 0 || sum(t, len) != 0)
        fail("bad MP config table signature/checksum");
    u16 count = *(const u16 *)(t + 34);
    printf("mp: floating pointer at 0x%lx, config table at 0x%lx (%u entries)\n", (u64)mpf, cfg,
           count);

    const u8 *e = t + 44, *end = t + len;
    for (u16 i = 0; i < count && e < end; i++) {
        if (e[0] == 0) {                    /* processor entry, 20 bytes */
            printf("mp: processor apic=%u%s%s\n", e[1], (e[3] & 1) ? " enabled" : " disabled",
                   (e[3] & 2) ? " bsp" : "");
            if ((e[3] & 1) && n < MAX_CPUS) /* enabled */
                ids[n++] = e[1];
            e += 20;
        } else {
            e += 8;
        }
    }
    printf("mp: cpus=%u\n", n);
    if (n == 0)
        fail("MP table lists no enabled processor");

start:;
    u32 bsp = my_apic_id();
    lapic_write(LAPIC_SVR, lapic_read(LAPIC_SVR) | 0x100 | 0xff); /* enable */
    report_up();

    memcpy((void *)TRAMP_BASE, ap_trampoline_start, ap_trampoline_end - ap_trampoline_start);
    ap_next_stack = (u64)&ap_stacks[MAX_CPUS - 1][STACK_SIZE];
    __asm__ volatile("" ::: "memory");

    for (u32 i = 0; i < n; i++) {
        if (ids[i] == bsp)
            continue;
        lapic_write(LAPIC_ESR, 0);
        send_ipi(ids[i], 0x0000c500);       /* INIT, level, assert */
        send_ipi(ids[i], 0x00008500);       /* INIT, level, de-assert */
        send_ipi(ids[i], 0x00000600 | (TRAMP_BASE >> 12)); /* SIPI */
        send_ipi(ids[i], 0x00000600 | (TRAMP_BASE >> 12)); /* SIPI again */
    }

    /* Bounded wait: under the CPL0 emulator 1e6 polls of this loop take
     * ~2.3 s, so this gives up after ~10 s (all-up normally takes < 0.1 s). */
    for (u32 i = 0; i < 4000000 && cpus_up < n; i++)
        cpu_relax();

    lock(&print_lock);
    u32 up = cpus_up;
    if (up >= n) {
        printf("cpus up: %u\n", up);
        unlock(&print_lock);
        debug_exit(0);
    }
    printf("cpus up: %u of %u\n", up, n);
    unlock(&print_lock);
    debug_exit(1);
}
