/* exit-poweroff: walk RSDP -> XSDT -> FADT (checking signatures and
 * checksums), then write SLP_TYP=5|SLP_EN to the FADT's SLEEP_CONTROL_REG. */
#include "guest.h"

const char guest_name[] = "exit-poweroff";

static noreturn fail(const char *why)
{
    printf("acpi: %s\n", why);
    debug_exit(3);
}

static u8 sum(const u8 *p, u32 n)
{
    u8 s = 0;
    while (n--)
        s += *p++;
    return s;
}

static const u8 *find_rsdp(void)
{
    for (u64 a = 0xe0000; a < 0x100000; a += 16) {
        const u8 *p = (const u8 *)a;
        if (memcmp(p, "RSD PTR ", 8) == 0 && sum(p, 20) == 0)
            return p;
    }
    return NULL;
}

/* check a standard ACPI table header; returns its length or 0 */
static u32 check_table(u64 addr, const char *sig)
{
    if (addr == 0 || addr + 36 > 0x100000000UL)
        return 0;
    const u8 *t = (const u8 *)addr;
    u32 len = *(const u32 *)(t + 4);
    if (memcmp(t, sig, 4) != 0 || len < 36 || len > 0x100000 || sum(t, len) != 0)
        return 0;
    return len;
}

void guest_main(const struct bootinfo *bi)
{
    (void)bi;
    const u8 *rsdp = find_rsdp();
    if (!rsdp)
        fail("no valid RSDP in 0xe0000-0xfffff");
    u8 rev = rsdp[15];
    printf("acpi: rsdp at 0x%lx revision %u oem \"%c%c%c%c%c%c\"\n", (u64)rsdp, rev,
           rsdp[9], rsdp[10], rsdp[11], rsdp[12], rsdp[13], rsdp[14]);
    if (rev < 2)
        fail("RSDP revision < 2 (no XSDT)");
    u32 rlen = *(const u32 *)(rsdp + 20);
    if (rlen < 36 || sum(rsdp, rlen) != 0)
        fail("RSDP extended checksum mismatch");
    u64 xsdt_addr = *(const u64 *)(rsdp + 24);
    u32 xlen = check_table(xsdt_addr, "XSDT");
    if (!xlen)
        fail("XSDT missing or bad signature/checksum");
    u32 n = (xlen - 36) / 8;
    printf("acpi: xsdt at 0x%lx entries=%u\n", xsdt_addr, n);

    const u8 *fadt = NULL;
    u32 flen = 0;
    for (u32 i = 0; i < n; i++) {
        u64 e = *(const u64 *)((const u8 *)xsdt_addr + 36 + 8 * i);
        const u8 *t = (const u8 *)e;
        if (e && e + 36 <= 0x100000000UL)
            printf("acpi: table %c%c%c%c at 0x%lx\n", t[0], t[1], t[2], t[3], e);
        if (!fadt && (flen = check_table(e, "FACP")))
            fadt = t;
    }
    if (!fadt)
        fail("no FACP with a valid checksum in the XSDT");
    u32 fflags = flen >= 116 ? *(const u32 *)(fadt + 112) : 0;
    printf("acpi: facp at 0x%lx length=%u revision=%u flags=0x%x%s\n", (u64)fadt, flen, fadt[8],
           fflags, (fflags & (1u << 20)) ? " (hw-reduced)" : "");
    if (flen < 244 + 12)
        fail("FADT too short for SLEEP_CONTROL_REG");
    const u8 *gas = fadt + 244;
    u64 port = *(const u64 *)(gas + 4);
    if (gas[0] != 1)
        fail(gas[0] == 0 ? "SLEEP_CONTROL_REG is in memory space, expected system I/O"
                         : "SLEEP_CONTROL_REG is not in system I/O space");
    if (port == 0 || port > 0xffff)
        fail("SLEEP_CONTROL_REG address is not a valid I/O port");
    printf("acpi: sleep-control port=0x%lx\n", port);
    outb((u16)port, (5 << 2) | (1 << 5));
    for (volatile int i = 0; i < 1000; i++)
        cpu_relax();
    printf("acpi: still running after S5 write\n");
    debug_exit(4);
}
