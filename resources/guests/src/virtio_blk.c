/* virtio-blk: a tiny polled driver for a virtio-blk device behind virtio-mmio
 * version 2 (virtio 1.2, 4.2.2 and 5.2). Probes, reads GET_ID and sector 0,
 * writes + flushes + reads back sector 1 (or, read-only, checks the write is
 * refused), reads past the end, then exits 0; any failure: reason, exit 1. */
#include "guest.h"

const char guest_name[] = "virtio-blk";

#define DEFAULT_MMIO_BASE 0xd0000000UL

/* ---- virtio-mmio registers ---- */
#define VIRTIO_MMIO_MAGIC 0x000
#define VIRTIO_MMIO_VERSION 0x004
#define VIRTIO_MMIO_DEVICE_ID 0x008
#define VIRTIO_MMIO_DEVICE_FEATURES 0x010
#define VIRTIO_MMIO_DEVICE_FEATURES_SEL 0x014
#define VIRTIO_MMIO_DRIVER_FEATURES 0x020
#define VIRTIO_MMIO_DRIVER_FEATURES_SEL 0x024
#define VIRTIO_MMIO_QUEUE_SEL 0x030
#define VIRTIO_MMIO_QUEUE_NUM_MAX 0x034
#define VIRTIO_MMIO_QUEUE_NUM 0x038
#define VIRTIO_MMIO_QUEUE_READY 0x044
#define VIRTIO_MMIO_QUEUE_NOTIFY 0x050
#define VIRTIO_MMIO_INTERRUPT_STATUS 0x060
#define VIRTIO_MMIO_INTERRUPT_ACK 0x064
#define VIRTIO_MMIO_STATUS 0x070
#define VIRTIO_MMIO_QUEUE_DESC_LOW 0x080
#define VIRTIO_MMIO_QUEUE_DESC_HIGH 0x084
#define VIRTIO_MMIO_QUEUE_DRIVER_LOW 0x090
#define VIRTIO_MMIO_QUEUE_DRIVER_HIGH 0x094
#define VIRTIO_MMIO_QUEUE_DEVICE_LOW 0x0a0
#define VIRTIO_MMIO_QUEUE_DEVICE_HIGH 0x0a4
#define VIRTIO_MMIO_CONFIG_GENERATION 0x0fc
#define VIRTIO_MMIO_CONFIG 0x100

#define VIRTIO_MAGIC 0x74726976 /* "virt" */

/* device status bits */
#define ST_ACKNOWLEDGE 1
#define ST_DRIVER 2
#define ST_DRIVER_OK 4
#define ST_FEATURES_OK 8
#define ST_NEEDS_RESET 0x40
#define ST_FAILED 0x80

/* feature bits */
#define VIRTIO_BLK_F_RO 5
#define VIRTIO_BLK_F_FLUSH 9
#define VIRTIO_F_VERSION_1 32

/* request types and status */
#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_T_FLUSH 4
#define VIRTIO_BLK_T_GET_ID 8
#define VIRTIO_BLK_S_OK 0

#define SECTOR_SIZE 512
#define ID_LEN 20

/* ---- split virtqueue (virtio 1.2, 2.7) ---- */
#define QSIZE_WANT 16
#define VIRTQ_DESC_F_NEXT 1
#define VIRTQ_DESC_F_WRITE 2
#define VIRTQ_AVAIL_F_NO_INTERRUPT 1

struct virtq_desc { u64 addr; u32 len; u16 flags, next; };
struct virtq_avail { u16 flags, idx; u16 ring[QSIZE_WANT]; u16 used_event; };
struct virtq_used_elem { u32 id, len; };
struct virtq_used { u16 flags, idx; struct virtq_used_elem ring[QSIZE_WANT]; u16 avail_event; };

/* All in .bss (guest RAM above 1 MiB); each part on its own page. */
static struct virtq_desc desc[QSIZE_WANT] __attribute__((aligned(4096)));
static struct virtq_avail avail __attribute__((aligned(4096)));
static struct virtq_used used __attribute__((aligned(4096)));

struct blk_req_hdr { u32 type, reserved; u64 sector; };
static struct blk_req_hdr hdr __attribute__((aligned(16)));
static volatile u8 req_status __attribute__((aligned(16)));
static u8 buf_a[SECTOR_SIZE] __attribute__((aligned(512)));
static u8 buf_b[SECTOR_SIZE] __attribute__((aligned(512)));
static u8 id_buf[ID_LEN + 1] __attribute__((aligned(16)));

static u64 base;
static u16 qsize;
static u16 avail_idx, used_seen;

#define barrier() __asm__ volatile("" ::: "memory")

static u32 rd(u32 off) { return mmio_read32(base + off); }
static void wr(u32 off, u32 v) { mmio_write32(base + off, v); }

static noreturn fail(const char *why)
{
    printf("virtio: error: %s (status=0x%x)\n", why, rd(VIRTIO_MMIO_STATUS));
    debug_exit(1);
}

/* "virtio_mmio.device=4K@0xd0000000:5" -> 0xd0000000 */
static u64 find_base(const char *cmdline)
{
    const char *v = cmdline_find(cmdline, "virtio_mmio.device");
    u64 b;
    if (v) {
        while (*v && *v != '@' && *v != ' ')
            v++;
        if (*v == '@' && parse_u64(v + 1, &b) && b && b < 0x100000000UL)
            return b;
    }
    return DEFAULT_MMIO_BASE;
}

static u64 read_capacity(void)
{
    for (int tries = 0; tries < 8; tries++) {
        u32 gen = rd(VIRTIO_MMIO_CONFIG_GENERATION);
        u64 lo = rd(VIRTIO_MMIO_CONFIG + 0);
        u64 hi = rd(VIRTIO_MMIO_CONFIG + 4);
        if (rd(VIRTIO_MMIO_CONFIG_GENERATION) == gen)
            return lo | hi << 32;
    }
    fail("config generation keeps changing");
}

static void add_desc(int i, void *addr, u32 len, u16 flags)
{
    desc[i].addr = (u64)addr;
    desc[i].len = len;
    desc[i].flags = flags;
    desc[i].next = (u16)(i + 1);
}

/* Submits one request (descriptors 0..n-1 already filled), polls the used ring
 * and returns the device's status byte. */
static u8 submit(int ndesc, u32 expect_len, const char *what)
{
    req_status = 0xff;
    desc[ndesc - 1].flags &= ~VIRTQ_DESC_F_NEXT;
    barrier();
    avail.ring[avail_idx & (qsize - 1)] = 0; /* head */
    barrier();
    avail_idx++;
    *(volatile u16 *)&avail.idx = avail_idx;
    barrier();
    wr(VIRTIO_MMIO_QUEUE_NOTIFY, 0);

    /* Each iteration is a few emulated instructions (~1 us each): ~10 s. */
    u32 i;
    for (i = 0; i < 2000000; i++) {
        if (*(volatile u16 *)&used.idx != used_seen)
            break;
        cpu_relax();
    }
    if (i == 2000000) {
        printf("virtio: timeout waiting for %s (used.idx=%u)\n", what,
               (u32)*(volatile u16 *)&used.idx);
        fail("request timed out");
    }
    barrier();
    struct virtq_used_elem e = used.ring[used_seen & (qsize - 1)];
    used_seen++;
    if (*(volatile u16 *)&used.idx != used_seen)
        fail("device completed more than one request");
    /* Not used for interrupts, but keep InterruptStatus clean. */
    u32 isr = rd(VIRTIO_MMIO_INTERRUPT_STATUS);
    if (isr)
        wr(VIRTIO_MMIO_INTERRUPT_ACK, isr);
    if (e.id != 0) {
        printf("virtio: %s: used id=%u, expected 0\n", what, e.id);
        fail("bad used element");
    }
    u8 st = req_status;
    if (st == VIRTIO_BLK_S_OK && e.len != expect_len)
        printf("virtio: note: %s: used len=%u, expected %u\n", what, e.len, expect_len);
    if (st == 0xff)
        fail("device did not write the status byte");
    return st;
}

static u8 rw_sector(u32 type, u64 sector, u8 *data, const char *what)
{
    hdr.type = type;
    hdr.reserved = 0;
    hdr.sector = sector;
    add_desc(0, &hdr, sizeof(hdr), VIRTQ_DESC_F_NEXT);
    add_desc(1, data, SECTOR_SIZE,
             VIRTQ_DESC_F_NEXT | (type == VIRTIO_BLK_T_IN ? VIRTQ_DESC_F_WRITE : 0));
    add_desc(2, (void *)&req_status, 1, VIRTQ_DESC_F_WRITE);
    return submit(3, (type == VIRTIO_BLK_T_IN ? SECTOR_SIZE : 0) + 1, what);
}

static void init_device(void)
{
    wr(VIRTIO_MMIO_STATUS, 0);
    if (rd(VIRTIO_MMIO_STATUS) != 0)
        fail("reset did not clear status");
    wr(VIRTIO_MMIO_STATUS, ST_ACKNOWLEDGE);
    wr(VIRTIO_MMIO_STATUS, ST_ACKNOWLEDGE | ST_DRIVER);
}

static u64 negotiate(void)
{
    wr(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
    u64 dev = rd(VIRTIO_MMIO_DEVICE_FEATURES);
    wr(VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
    dev |= (u64)rd(VIRTIO_MMIO_DEVICE_FEATURES) << 32;
    if (!(dev & (1UL << VIRTIO_F_VERSION_1)))
        fail("device does not offer VIRTIO_F_VERSION_1");
    u64 drv = dev & ((1UL << VIRTIO_F_VERSION_1) | (1UL << VIRTIO_BLK_F_FLUSH) |
                     (1UL << VIRTIO_BLK_F_RO));
    wr(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    wr(VIRTIO_MMIO_DRIVER_FEATURES, (u32)drv);
    wr(VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    wr(VIRTIO_MMIO_DRIVER_FEATURES, (u32)(drv >> 32));
    wr(VIRTIO_MMIO_STATUS, ST_ACKNOWLEDGE | ST_DRIVER | ST_FEATURES_OK);
    if (!(rd(VIRTIO_MMIO_STATUS) & ST_FEATURES_OK))
        fail("device refused our features (FEATURES_OK not set)");
    return drv;
}

static void setup_queue(void)
{
    wr(VIRTIO_MMIO_QUEUE_SEL, 0);
    if (rd(VIRTIO_MMIO_QUEUE_READY) != 0)
        fail("queue 0 already ready");
    u32 max = rd(VIRTIO_MMIO_QUEUE_NUM_MAX);
    if (max == 0)
        fail("queue 0 does not exist");
    qsize = QSIZE_WANT;
    while (qsize > max)
        qsize >>= 1;
    wr(VIRTIO_MMIO_QUEUE_NUM, qsize);
    avail.flags = VIRTQ_AVAIL_F_NO_INTERRUPT;
    barrier();
    wr(VIRTIO_MMIO_QUEUE_DESC_LOW, (u32)(u64)desc);
    wr(VIRTIO_MMIO_QUEUE_DESC_HIGH, (u32)((u64)desc >> 32));
    wr(VIRTIO_MMIO_QUEUE_DRIVER_LOW, (u32)(u64)&avail);
    wr(VIRTIO_MMIO_QUEUE_DRIVER_HIGH, (u32)((u64)&avail >> 32));
    wr(VIRTIO_MMIO_QUEUE_DEVICE_LOW, (u32)(u64)&used);
    wr(VIRTIO_MMIO_QUEUE_DEVICE_HIGH, (u32)((u64)&used >> 32));
    wr(VIRTIO_MMIO_QUEUE_READY, 1);
    if (rd(VIRTIO_MMIO_QUEUE_READY) != 1)
        fail("QueueReady did not stick");
}

void guest_main(const struct bootinfo *bi)
{
    base = find_base(bi->cmdline);

    u32 magic = rd(VIRTIO_MMIO_MAGIC), version = rd(VIRTIO_MMIO_VERSION);
    u32 device = rd(VIRTIO_MMIO_DEVICE_ID);
    printf("virtio: magic=0x%x version=%u device=%u\n", magic, version, device);
    if (magic != VIRTIO_MAGIC || version != 2 || device != 2) {
        printf("virtio: error: no virtio-mmio v2 block device at 0x%lx\n", base);
        debug_exit(1);
    }

    init_device();
    u64 features = negotiate();
    int ro = !!(features & (1UL << VIRTIO_BLK_F_RO));
    int has_flush = !!(features & (1UL << VIRTIO_BLK_F_FLUSH));
    u64 capacity = read_capacity();
    printf("virtio: capacity=%lu ro=%d\n", capacity, ro);
    setup_queue();
    wr(VIRTIO_MMIO_STATUS, ST_ACKNOWLEDGE | ST_DRIVER | ST_FEATURES_OK | ST_DRIVER_OK);
    u32 st = rd(VIRTIO_MMIO_STATUS);
    if (st & (ST_NEEDS_RESET | ST_FAILED) || !(st & ST_DRIVER_OK))
        fail("device did not accept DRIVER_OK");

    /* GET_ID: up to 20 bytes, NUL-terminated only if shorter. */
    hdr.type = VIRTIO_BLK_T_GET_ID;
    hdr.reserved = 0;
    hdr.sector = 0;
    add_desc(0, &hdr, sizeof(hdr), VIRTQ_DESC_F_NEXT);
    add_desc(1, id_buf, ID_LEN, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE);
    add_desc(2, (void *)&req_status, 1, VIRTQ_DESC_F_WRITE);
    u8 s = submit(3, ID_LEN + 1, "GET_ID");
    if (s != VIRTIO_BLK_S_OK) {
        printf("virtio: id status=%u\n", s);
        fail("GET_ID failed");
    }
    id_buf[ID_LEN] = 0;
    for (int i = 0; i < ID_LEN && id_buf[i]; i++)
        if (id_buf[i] < 0x20 || id_buf[i] > 0x7e)
            id_buf[i] = '?';
    printf("virtio: id=%s\n", (const char *)id_buf);

    /* Sector 0. */
    s = rw_sector(VIRTIO_BLK_T_IN, 0, buf_a, "read sector 0");
    if (s != VIRTIO_BLK_S_OK) {
        printf("virtio: read status=%u\n", s);
        fail("reading sector 0 failed");
    }
    puts_raw("virtio: sector0=");
    for (int i = 0; i < 16; i++)
        printf("%02x", buf_a[i]);
    puts_raw("\n");

    /* Sector 1: pattern write (+ flush + read-back). */
    for (int i = 0; i < SECTOR_SIZE; i++)
        buf_a[i] = (u8)((i * 7 + 3) & 0xff);
    s = rw_sector(VIRTIO_BLK_T_OUT, 1, buf_a, "write sector 1");
    if (ro) {
        printf("virtio: write status=%u\n", s);
        if (s == VIRTIO_BLK_S_OK)
            fail("write to a read-only disk succeeded");
    } else {
        if (s != VIRTIO_BLK_S_OK) {
            printf("virtio: write status=%u\n", s);
            fail("writing sector 1 failed");
        }
        if (has_flush) {
            hdr.type = VIRTIO_BLK_T_FLUSH;
            hdr.reserved = 0;
            hdr.sector = 0;
            add_desc(0, &hdr, sizeof(hdr), VIRTQ_DESC_F_NEXT);
            add_desc(1, (void *)&req_status, 1, VIRTQ_DESC_F_WRITE);
            s = submit(2, 1, "FLUSH");
            if (s != VIRTIO_BLK_S_OK) {
                printf("virtio: flush status=%u\n", s);
                fail("flush failed");
            }
        } else {
            printf("virtio: note: device does not offer FLUSH\n");
        }
        memset(buf_b, 0, SECTOR_SIZE);
        s = rw_sector(VIRTIO_BLK_T_IN, 1, buf_b, "read sector 1");
        if (s != VIRTIO_BLK_S_OK) {
            printf("virtio: read status=%u\n", s);
            fail("reading sector 1 back failed");
        }
        if (memcmp(buf_a, buf_b, SECTOR_SIZE) == 0) {
            printf("virtio: write+flush ok\n");
        } else {
            printf("virtio: readback mismatch\n");
            debug_exit(1);
        }
    }

    /* Hostile: read the sector just past the end. */
    s = rw_sector(VIRTIO_BLK_T_IN, capacity, buf_b, "past-end read");
    printf("virtio: past-end status=%u\n", s);
    if (s == VIRTIO_BLK_S_OK)
        fail("reading past the end succeeded");

    printf("virtio: done\n");
    debug_exit(0);
}
