/*
 * What the initramfs' freestanding helpers (ember-init, ember-exit, ember-bench) share: system
 * calls without libc, a few string helpers and the process entry. Each helper defines
 *   static __attribute__((used, noreturn)) void cmain(long *sp)
 * which _start calls with the initial stack: sp[0] is argc, then argv, a NULL, envp, a NULL.
 * No libc keeps each helper around 1 KiB and its start-up to a few emulated instructions.
 */
#ifndef EMBER_FREESTANDING_H
#define EMBER_FREESTANDING_H

typedef unsigned long u64;

#define SYS_read 0
#define SYS_write 1
#define SYS_open 2
#define SYS_close 3
#define SYS_ioctl 16
#define SYS_pread64 17
#define SYS_socket 41
#define SYS_connect 42
#define SYS_accept 43
#define SYS_shutdown 48
#define SYS_bind 49
#define SYS_listen 50
#define SYS_setsockopt 54
#define SYS_execve 59
#define SYS_exit 60
#define SYS_fdatasync 75
#define SYS_mkdir 83
#define SYS_mount 165
#define SYS_ioperm 173
#define SYS_clock_gettime 228

static inline long sys6(long nr, long a, long b, long c, long d, long e, long f)
{
	long ret;
	register long r10 asm("r10") = d;
	register long r8 asm("r8") = e;
	register long r9 asm("r9") = f;
	asm volatile("syscall"
		     : "=a"(ret)
		     : "a"(nr), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
		     : "rcx", "r11", "memory");
	return ret;
}
#define sys3(nr, a, b, c) sys6(nr, (long)(a), (long)(b), (long)(c), 0, 0, 0)

static inline u64 slen(const char *s)
{
	u64 n = 0;
	while (s[n])
		n++;
	return n;
}

static inline void put(int fd, const char *s)
{
	sys3(SYS_write, fd, s, slen(s));
}

static inline __attribute__((noreturn)) void quit(int status)
{
	sys3(SYS_exit, status, 0, 0);
	__builtin_unreachable();
}

/* One byte OUT to an I/O port the caller has ioperm() for. */
static inline void outb(unsigned short port, unsigned char value)
{
	asm volatile("outb %b0, %w1" : : "a"(value), "Nd"(port));
}

static __attribute__((used, noreturn)) void cmain(long *sp);

asm(".text\n"
    ".globl _start\n"
    "_start:\n"
    "	mov %rsp, %rdi\n"
    "	and $-16, %rsp\n"
    "	call cmain\n");

#endif
