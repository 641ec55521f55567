/*
 * ember-exit STATUS: ends the VM with exit code STATUS (0-255) through Ember's debug-exit port,
 * a one-byte OUT to I/O port 0xf4 (QEMU's isa-debug-exit device makes QEMU exit with
 * (STATUS << 1) | 1 instead).
 *
 * It first waits until the console has sent everything written to it (tcdrain on stdout and
 * stderr), since the VM ends at the OUT. It gets the port with ioperm(0xf4, 1, 1), so it must
 * run as root. If the OUT returns (no debug-exit device) or ioperm() fails, it exits with 1 and
 * the caller falls back to `reboot -f`.
 */
#include "freestanding.h"

#define TCSBRK 0x5409 /* ioctl(fd, TCSBRK, 1) is tcdrain(fd) */
#define DEBUG_EXIT_PORT 0xf4

static __attribute__((noreturn)) void usage(void)
{
	put(2, "usage: ember-exit STATUS (a number from 0 to 255)\n");
	quit(2);
}

static __attribute__((used, noreturn)) void cmain(long *sp)
{
	long argc = sp[0];
	char **argv = (char **)(sp + 1);
	unsigned long status = 0;
	const char *p;

	if (argc != 2 || !argv[1][0])
		usage();
	for (p = argv[1]; *p; p++) {
		if (*p < '0' || *p > '9' || status > 255)
			usage();
		status = status * 10 + (unsigned long)(*p - '0');
	}
	if (status > 255)
		usage();

	sys3(SYS_ioctl, 1, TCSBRK, 1);
	sys3(SYS_ioctl, 2, TCSBRK, 1);
	if (sys3(SYS_ioperm, DEBUG_EXIT_PORT, 1, 1) != 0) {
		put(2, "ember-exit: ioperm(0xf4) failed\n");
		quit(1);
	}
	outb(DEBUG_EXIT_PORT, (unsigned char)status);
	put(2, "ember-exit: no debug-exit device at port 0xf4\n");
	quit(1);
}
