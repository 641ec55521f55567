/*
 * ember-exit STATUS: ends the VM with exit code STATUS (0-255) through Ember's debug-exit port,
 * a one-byte OUT to I/O port 0xf4 (QEMU's isa-debug-exit device makes QEMU exit with
 * (STATUS << 1) | 1 instead).
 *
 * It first waits until the console has sent everything written to it (tcdrain on stdout and
 * stderr), since the VM ends at the OUT. It gets the port with ioperm(0xf4, 1, 1), so it must
 * run as root. If the OUT returns (no debug-exit device) or ioperm() fails, it exits with 1 and
 * the caller falls back to `reboot -f`.
 *
 * Freestanding (no libc) so the binary stays around 1 KiB:
 *   gcc -static -nostdlib -ffreestanding -Os -fno-stack-protector -fno-pie -no-pie -s -o ember-exit ember-exit.c
 */
#define SYS_write 1
#define SYS_ioctl 16
#define SYS_exit 60
#define SYS_ioperm 173
#define TCSBRK 0x5409 /* ioctl(fd, TCSBRK, 1) is tcdrain(fd) */
#define DEBUG_EXIT_PORT 0xf4

static long syscall3(long nr, long a, long b, long c)
{
	long ret;
	asm volatile("syscall"
		     : "=a"(ret)
		     : "a"(nr), "D"(a), "S"(b), "d"(c)
		     : "rcx", "r11", "memory");
	return ret;
}

static void say(const char *s)
{
	long n = 0;
	while (s[n])
		n++;
	syscall3(SYS_write, 2, (long)s, n);
}

static __attribute__((noreturn)) void quit(int status)
{
	syscall3(SYS_exit, status, 0, 0);
	__builtin_unreachable();
}

__attribute__((used, noreturn)) static void cmain(long *sp)
{
	long argc = sp[0];
	char **argv = (char **)(sp + 1);
	unsigned long status = 0;
	const char *p;

	if (argc != 2 || !argv[1][0]) {
		say("usage: ember-exit STATUS (0-255)\n");
		quit(2);
	}
	for (p = argv[1]; *p; p++) {
		if (*p < '0' || *p > '9' || status > 255) {
			say("ember-exit: STATUS must be a number from 0 to 255\n");
			quit(2);
		}
		status = status * 10 + (unsigned long)(*p - '0');
	}
	if (status > 255) {
		say("ember-exit: STATUS must be a number from 0 to 255\n");
		quit(2);
	}

	syscall3(SYS_ioctl, 1, TCSBRK, 1);
	syscall3(SYS_ioctl, 2, TCSBRK, 1);
	if (syscall3(SYS_ioperm, DEBUG_EXIT_PORT, 1, 1) != 0) {
		say("ember-exit: ioperm(0xf4) failed\n");
		quit(1);
	}
	asm volatile("outb %b0, %w1" : : "a"(status), "Nd"(DEBUG_EXIT_PORT));
	say("ember-exit: no debug-exit device at port 0xf4\n");
	quit(1);
}

asm(".text\n"
    ".globl _start\n"
    "_start:\n"
    "	mov %rsp, %rdi\n"
    "	and $-16, %rsp\n"
    "	call cmain\n");
