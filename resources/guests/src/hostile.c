/* hostile: a guest that writes seeded random values, in random widths, to every port and MMIO
 * register Ember emulates (COM1, the i8042, the boot timer, the ACPI sleep registers, the
 * extended-state port, the IOAPIC, every virtio-mmio window on the command line) and to ports
 * and addresses nothing answers, reading some back, for iterations=N rounds (default 10000) from
 * seed=S (default 1), then ends with status 42. Only what would end the VM on request is left
 * out: the debug-exit port, ACPI's sleep-enable bit and the i8042's reset command. */
#include "guest.h"

const char guest_name[] = "hostile";

#define IOAPIC_BASE 0xfec00000UL
#define MAX_WINDOWS 16

static u64 state;

/* xorshift64 */
static u64 rnd(void)
{
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return state;
}

static u64 value_for(void)
{
    switch (rnd() % 4) {
    case 0: return 0;
    case 1: return ~0UL;
    case 2: return 1UL << (rnd() % 32);
    default: return rnd();
    }
}

static u16 pick_port(void)
{
    static const u16 ports[] = {0x3f8, 0x3f9, 0x3fa, 0x3fb, 0x3fc, 0x3fd, 0x3fe, 0x3ff,
                                0x60,  0x64,  0x80,  0x600, 0x601, 0x604, 0x5e0, 0x5e4,
                                0xcf8, 0xcfc, 0x70,  0x71};
    if (rnd() % 8 == 0)
        return (u16)rnd();
    return ports[rnd() % (sizeof(ports) / sizeof(ports[0]))];
}

static void poke_port(void)
{
    u16 port = pick_port();
    u32 v = (u32)value_for();
    if (port == DEBUG_EXIT_PORT)
        return;
    if (port >= 0x600 && port < 0x610)
        v &= ~0x20u; /* SLP_EN */
    if (port == 0x64 && (u8)v == 0xfe)
        v = 0; /* the i8042's reset command */
    switch (rnd() % 6) {
    case 0: (void)inb(port); break;
    case 1: { u16 r; __asm__ volatile("inw %1, %0" : "=a"(r) : "Nd"(port)); (void)r; break; }
    case 2: { u32 r; __asm__ volatile("inl %1, %0" : "=a"(r) : "Nd"(port)); (void)r; break; }
    case 3: __asm__ volatile("outw %0, %1" ::"a"((u16)v), "Nd"(port)); break;
    case 4: __asm__ volatile("outl %0, %1" ::"a"(v), "Nd"(port)); break;
    default: outb(port, (u8)v); break;
    }
}

static void poke_mmio(u64 base, u64 len)
{
    u64 a = base + (rnd() % len);
    u64 v = value_for();
    switch (rnd() % 8) {
    case 0: (void)*(volatile u8 *)a; break;
    case 1: (void)*(volatile u32 *)(a & ~3UL); break;
    case 2: *(volatile u8 *)a = (u8)v; break;
    case 3: *(volatile u16 *)(a & ~1UL) = (u16)v; break;
    case 4: *(volatile u64 *)(a & ~7UL) = v; break;
    default: *(volatile u32 *)(a & ~3UL) = (u32)v; break;
    }
}

/* Every "virtio_mmio.device=4K@0xADDR:IRQ" on the command line. */
static int windows(const char *cmdline, u64 *out)
{
    static const char key[] = "virtio_mmio.device=";
    int n = 0;
    for (const char *p = cmdline; *p && n < MAX_WINDOWS; p++) {
        if ((p == cmdline || p[-1] == ' ') && !strncmp(p, key, sizeof(key) - 1)) {
            const char *at = p + sizeof(key) - 1;
            while (*at && *at != '@' && *at != ' ')
                at++;
            if (*at == '@' && parse_u64(at + 1, &out[n]))
                n++;
        }
    }
    return n;
}

void guest_main(const struct bootinfo *bi)
{
    u64 iterations = 10000, seed = 1, win[MAX_WINDOWS];
    const char *v = cmdline_find(bi->cmdline, "iterations");
    if (v)
        parse_u64(v, &iterations);
    v = cmdline_find(bi->cmdline, "seed");
    if (v)
        parse_u64(v, &seed);
    state = seed ? seed : 1;
    int nwin = windows(bi->cmdline, win);
    printf("hostile: %lu rounds, seed %lu, %d virtio windows\n", iterations, seed, nwin);
    for (u64 i = 0; i < iterations; i++) {
        switch (rnd() % 4) {
        case 0:
            poke_mmio(IOAPIC_BASE, 0x100);
            break;
        case 1:
            if (nwin) {
                poke_mmio(win[rnd() % nwin], 0x1000);
                break;
            }
            /* fall through */
        case 2:
            /* Where nothing answers: the MMIO hole above the devices. */
            if (rnd() % 4 == 0) {
                poke_mmio(0xd0100000UL, 0x100000);
                break;
            }
            /* fall through */
        default:
            poke_port();
            break;
        }
    }
    printf("hostile: done\n");
    debug_exit(42);
}
