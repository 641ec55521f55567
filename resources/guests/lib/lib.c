/* Serial output, a tiny printf, string helpers and cmdline parsing. */
#include "guest.h"

void serial_putc(char c)
{
    /* The emulated UART is always ready; one LSR check keeps real 16550s happy. */
    (void)inb(COM1 + 5);
    outb(COM1, (u8)c);
}

void puts_raw(const char *s)
{
    while (*s)
        serial_putc(*s++);
}

noreturn debug_exit(u8 code)
{
    outb(DEBUG_EXIT_PORT, code);
    halt_forever();
}

noreturn halt_forever(void)
{
    for (;;)
        __asm__ volatile("cli; hlt");
}

void *memcpy(void *d, const void *s, size_t n)
{
    u8 *dp = d;
    const u8 *sp = s;
    while (n--)
        *dp++ = *sp++;
    return d;
}

void *memset(void *d, int c, size_t n)
{
    u8 *dp = d;
    while (n--)
        *dp++ = (u8)c;
    return d;
}

int memcmp(const void *a, const void *b, size_t n)
{
    const u8 *x = a, *y = b;
    for (; n; n--, x++, y++)
        if (*x != *y)
            return *x - *y;
    return 0;
}

size_t strlen(const char *s)
{
    size_t n = 0;
    while (s[n])
        n++;
    return n;
}

int strncmp(const char *a, const char *b, size_t n)
{
    for (; n; n--, a++, b++) {
        if (*a != *b)
            return (u8)*a - (u8)*b;
        if (!*a)
            return 0;
    }
    return 0;
}

const char *cmdline_find(const char *c, const char *key)
{
    size_t kl = strlen(key);
    int at_start = 1;
    for (; *c; c++) {
        if (at_start && strncmp(c, key, kl) == 0 && c[kl] == '=')
            return c + kl + 1;
        at_start = (*c == ' ' || *c == '\t' || *c == '\n');
    }
    return NULL;
}

int parse_u64(const char *s, u64 *out)
{
    u64 v = 0;
    int n = 0, base = 10;
    if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
        base = 16;
        n = 2;
    }
    int start = n;
    for (;; n++) {
        char ch = s[n];
        u64 d;
        if (ch >= '0' && ch <= '9')
            d = ch - '0';
        else if (base == 16 && ch >= 'a' && ch <= 'f')
            d = ch - 'a' + 10;
        else if (base == 16 && ch >= 'A' && ch <= 'F')
            d = ch - 'A' + 10;
        else
            break;
        v = v * base + d;
    }
    if (n == start)
        return 0;
    *out = v;
    return n;
}

/* ---- printf: %s %c %d %u %x %p, flags '0', width, length l/ll/z ---- */
static void put_num(u64 v, int base, int width, int zero, int neg)
{
    char buf[24];
    int i = 0;
    do {
        u64 d = v % base;
        buf[i++] = (char)(d < 10 ? '0' + d : 'a' + d - 10);
        v /= base;
    } while (v);
    if (neg)
        buf[i++] = '-';
    for (int w = i; w < width; w++)
        serial_putc(zero ? '0' : ' ');
    while (i)
        serial_putc(buf[--i]);
}

int printf(const char *fmt, ...)
{
    __builtin_va_list ap;
    __builtin_va_start(ap, fmt);
    for (; *fmt; fmt++) {
        if (*fmt != '%') {
            serial_putc(*fmt);
            continue;
        }
        fmt++;
        int zero = 0, width = 0, lng = 0;
        if (*fmt == '0') {
            zero = 1;
            fmt++;
        }
        while (*fmt >= '0' && *fmt <= '9')
            width = width * 10 + (*fmt++ - '0');
        while (*fmt == 'l' || *fmt == 'z') {
            lng = 1;
            fmt++;
        }
        switch (*fmt) {
        case 's': {
            const char *s = __builtin_va_arg(ap, const char *);
            puts_raw(s ? s : "(null)");
            break;
        }
        case 'c':
            serial_putc((char)__builtin_va_arg(ap, int));
            break;
        case 'd': {
            i64 v = lng ? __builtin_va_arg(ap, i64) : __builtin_va_arg(ap, int);
            put_num(v < 0 ? (u64)-v : (u64)v, 10, width, zero, v < 0);
            break;
        }
        case 'u':
        case 'x': {
            u64 v = lng ? __builtin_va_arg(ap, u64) : __builtin_va_arg(ap, u32);
            put_num(v, *fmt == 'u' ? 10 : 16, width, zero, 0);
            break;
        }
        case 'p':
            puts_raw("0x");
            put_num((u64)__builtin_va_arg(ap, void *), 16, 0, 0, 0);
            break;
        case '%':
            serial_putc('%');
            break;
        default:
            serial_putc('%');
            if (*fmt)
                serial_putc(*fmt);
            else
                fmt--;
        }
    }
    __builtin_va_end(ap);
    return 0;
}
