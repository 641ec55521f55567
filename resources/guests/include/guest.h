/* Shared declarations for the Ember micro-guests. */
#ifndef EMBER_GUEST_H
#define EMBER_GUEST_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef long i64;
typedef unsigned long size_t;

#define NULL ((void *)0)
#define noreturn __attribute__((noreturn)) void

/* ---- port I/O ---- */
static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline void cpu_relax(void) { __asm__ volatile("" ::: "memory"); } /* no `pause` */
static inline u32 mmio_read32(u64 a) { return *(volatile u32 *)a; }
static inline void mmio_write32(u64 a, u32 v) { *(volatile u32 *)a = v; }

#define COM1 0x3f8
#define DEBUG_EXIT_PORT 0xf4

/* ---- boot information, filled in by the entry code (lib/boot.c) ---- */
enum boot_proto { BOOT_PVH = 1, BOOT_LINUX64 = 2 };
#define MAX_MEM 128
struct mem_entry { u64 addr, size; u32 type; };
struct bootinfo {
    int proto;
    u64 raw;              /* phys addr of hvm_start_info / boot_params */
    const char *cmdline;  /* never NULL ("" if none) */
    u32 nmem;
    struct mem_entry mem[MAX_MEM];
    int has_initrd;
    u64 initrd_addr, initrd_size;
};

/* Every guest defines these two. */
extern const char guest_name[];
void guest_main(const struct bootinfo *bi);

/* ---- lib ---- */
void serial_putc(char c);
void puts_raw(const char *s);
int printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
noreturn debug_exit(u8 code);
noreturn halt_forever(void);

void *memcpy(void *d, const void *s, size_t n);
void *memset(void *d, int c, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
int strncmp(const char *a, const char *b, size_t n);

/* cmdline: find "key=" at a token start; returns pointer to value or NULL */
const char *cmdline_find(const char *cmdline, const char *key);
/* parse decimal or 0x-hex; returns number of chars consumed (0 = none) */
int parse_u64(const char *s, u64 *out);

/* x86 bits */
struct __attribute__((packed)) dtr { u16 limit; u64 base; };

#endif
