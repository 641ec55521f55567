/*
 * ember-bench: the guest half of resources/bench/bench.py. It times block and TCP I/O inside the
 * guest and prints integers only, one "EMBER-BENCH key=value" line each (bytes, operations,
 * nanoseconds of CLOCK_MONOTONIC); the host computes the rates.
 *
 *   ember-bench write DEV MIB          O_DIRECT sequential write of MIB MiB in 1 MiB blocks from
 *                                      offset 0, then fdatasync (timed apart: a virtio FLUSH)
 *   ember-bench read DEV MIB           O_DIRECT sequential read of MIB MiB in 1 MiB blocks
 *   ember-bench randread DEV MIB SECS  O_DIRECT 4 KiB reads at random aligned offsets in the first
 *                                      MIB MiB, one at a time (queue depth 1), for SECS seconds
 *   ember-bench get IP PORT PATH KEY   HTTP/1.0 GET of PATH from IP:PORT, timed from connect to
 *                                      EOF: KEY_bytes (body) and KEY_ns
 *   ember-bench serve PORT MIB         accepts one connection on PORT, answers its request with
 *                                      MIB MiB (HTTP/1.0), then waits for the peer to close;
 *                                      prints "EMBER-BENCH serving=PORT" once listening
 *
 * Exit status 0 on success, 1 on an I/O error (with a message), 2 on bad arguments.
 * Freestanding (no libc), like ember-exit: every system call is emulated kernel work on software
 * KVM, so the tool makes as few as it can, and its start-up is outside every timed window.
 */
#include "freestanding.h"

#define O_RDONLY 0
#define O_RDWR 2
#define O_DIRECT 040000
#define CLOCK_MONOTONIC 1
#define AF_INET 2
#define SOCK_STREAM 1
#define SOL_SOCKET 1
#define SO_REUSEADDR 2
#define SHUT_WR 1

#define MIB (1UL << 20)
#define SMALL 4096UL

static unsigned char buf[MIB] __attribute__((aligned(4096)));

static __attribute__((noreturn)) void fail(const char *what, long err)
{
	char num[24];
	int i = 23;
	u64 v = (u64)(err < 0 ? -err : err);
	num[i] = 0;
	do {
		num[--i] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	put(2, "ember-bench: ");
	put(2, what);
	put(2, " failed, errno ");
	put(2, num + i);
	put(2, "\n");
	quit(1);
}

static __attribute__((noreturn)) void usage(void)
{
	put(2, "usage: ember-bench write|read DEV MIB | randread DEV MIB SECS | "
	       "get IP PORT PATH KEY | serve PORT MIB\n");
	quit(2);
}

/* Prints "EMBER-BENCH <key><suffix>=<value>\n" in one write. */
static void report(const char *key, const char *suffix, u64 value)
{
	char line[128], num[24];
	u64 n = 0, i;
	int d = 23;
	const char *parts[3] = {"EMBER-BENCH ", key, suffix};
	num[d] = 0;
	do {
		num[--d] = (char)('0' + value % 10);
		value /= 10;
	} while (value);
	for (i = 0; i < 3; i++) {
		const char *p = parts[i];
		while (*p && n < 80)
			line[n++] = *p++;
	}
	line[n++] = '=';
	for (i = (u64)d; num[i]; i++)
		line[n++] = num[i];
	line[n++] = '\n';
	sys3(SYS_write, 1, line, n);
}

static u64 number(const char *s)
{
	u64 v = 0;
	if (!*s)
		usage();
	for (; *s; s++) {
		if (*s < '0' || *s > '9' || v > (1UL << 40))
			usage();
		v = v * 10 + (u64)(*s - '0');
	}
	return v;
}

static u64 now_ns(void)
{
	long ts[2];
	sys3(SYS_clock_gettime, CLOCK_MONOTONIC, ts, 0);
	return (u64)ts[0] * 1000000000UL + (u64)ts[1];
}

static int open_dev(const char *dev, long flags)
{
	long fd = sys3(SYS_open, dev, flags | O_DIRECT, 0);
	if (fd < 0)
		fail("open", fd);
	return (int)fd;
}

static void seq(const char *dev, u64 mib, int writing)
{
	int fd = open_dev(dev, writing ? O_RDWR : O_RDONLY);
	u64 i, t0, t1;
	for (i = 0; i < MIB; i++)
		buf[i] = (unsigned char)(i * 2654435761UL >> 24);
	t0 = now_ns();
	for (i = 0; i < mib; i++) {
		long n = sys3(writing ? SYS_write : SYS_read, fd, buf, MIB);
		if (n != (long)MIB)
			fail(writing ? "write" : "read", n);
	}
	t1 = now_ns();
	report(writing ? "blk_write" : "blk_read", "_bytes", mib * MIB);
	report(writing ? "blk_write" : "blk_read", "_ns", t1 - t0);
	if (writing) {
		long r = sys3(SYS_fdatasync, fd, 0, 0);
		if (r)
			fail("fdatasync", r);
		report("blk_flush", "_ns", now_ns() - t1);
	}
	sys3(SYS_close, fd, 0, 0);
}

static void randread(const char *dev, u64 mib, u64 secs)
{
	int fd = open_dev(dev, O_RDONLY);
	u64 blocks = mib * (MIB / SMALL), x, ops = 0, t0, t = 0, end;
	if (!blocks)
		usage();
	t0 = now_ns();
	x = t0 | 1;
	end = t0 + secs * 1000000000UL;
	do {
		int k;
		for (k = 0; k < 16; k++) {
			long n;
			x ^= x << 13;
			x ^= x >> 7;
			x ^= x << 17;
			n = sys6(SYS_pread64, fd, (long)buf, SMALL, (long)((x % blocks) * SMALL), 0, 0);
			if (n != (long)SMALL)
				fail("pread", n);
			ops++;
		}
		t = now_ns();
	} while (t < end);
	report("blk_randread", "_ops", ops);
	report("blk_randread", "_ns", t - t0);
	sys3(SYS_close, fd, 0, 0);
}

/* struct sockaddr_in */
struct sin {
	unsigned short family, port;
	unsigned int addr;
	unsigned char zero[8];
};

static void make_sin(struct sin *a, const char *ip, u64 port)
{
	unsigned int addr = 0, octet = 0, dots = 0;
	unsigned char *z = (unsigned char *)a;
	u64 i;
	for (i = 0; i < sizeof(*a); i++)
		z[i] = 0;
	if (port == 0 || port > 65535)
		usage();
	for (; ip && *ip; ip++) {
		if (*ip == '.') {
			addr |= octet << (8 * dots++);
			octet = 0;
		} else if (*ip >= '0' && *ip <= '9' && octet < 256) {
			octet = octet * 10 + (unsigned)(*ip - '0');
		} else {
			usage();
		}
	}
	if (ip && (dots != 3 || octet > 255))
		usage();
	if (ip)
		addr |= octet << 24; /* network order on a little-endian CPU */
	a->family = AF_INET;
	a->port = (unsigned short)((port >> 8) | ((port & 0xff) << 8));
	a->addr = addr;
}

static void write_all(int fd, const void *p, u64 n)
{
	const char *c = p;
	while (n) {
		long w = sys3(SYS_write, fd, c, n);
		if (w <= 0)
			fail("send", w);
		c += w;
		n -= (u64)w;
	}
}

static void get(const char *ip, u64 port, const char *path, const char *key)
{
	struct sin a;
	long fd, r;
	u64 t0, total = 0, header = 0;
	/* The end of the header, "\r\n\r\n", tracked across reads. */
	unsigned int tail = 0, in_header = 1;
	unsigned char status = 0;
	make_sin(&a, ip, port);
	fd = sys3(SYS_socket, AF_INET, SOCK_STREAM, 0);
	if (fd < 0)
		fail("socket", fd);
	t0 = now_ns();
	r = sys3(SYS_connect, fd, &a, sizeof(a));
	if (r)
		fail("connect", r);
	write_all((int)fd, "GET ", 4);
	write_all((int)fd, path, slen(path));
	write_all((int)fd, " HTTP/1.0\r\n\r\n", 13);
	for (;;) {
		long n = sys3(SYS_read, fd, buf, MIB), i;
		if (n < 0)
			fail("recv", n);
		if (n == 0)
			break;
		if (total == 0 && n > 9)
			status = buf[9]; /* "HTTP/1.x 200" */
		total += (u64)n;
		for (i = 0; in_header && i < n; i++) {
			header++;
			tail = (tail << 8) | buf[i];
			if (tail == 0x0d0a0d0a)
				in_header = 0;
		}
	}
	report(key, "_ns", now_ns() - t0);
	if (in_header || status != '2')
		fail("HTTP GET (no 2xx answer)", 0);
	report(key, "_bytes", total - header);
	sys3(SYS_close, fd, 0, 0);
}

static void serve(u64 port, u64 mib)
{
	struct sin a;
	long s, c, r;
	int one = 1;
	u64 i;
	char hdr[96];
	const char *h1 = "HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\n"
			 "Content-Length: ";
	u64 n = 0, len = mib * MIB;
	char num[24];
	int d = 23;
	make_sin(&a, 0, port);
	s = sys3(SYS_socket, AF_INET, SOCK_STREAM, 0);
	if (s < 0)
		fail("socket", s);
	sys6(SYS_setsockopt, s, SOL_SOCKET, SO_REUSEADDR, (long)&one, sizeof(one), 0);
	r = sys3(SYS_bind, s, &a, sizeof(a));
	if (r)
		fail("bind", r);
	r = sys3(SYS_listen, s, 1, 0);
	if (r)
		fail("listen", r);
	report("serving", "", port);
	c = sys3(SYS_accept, s, 0, 0);
	if (c < 0)
		fail("accept", c);
	/* The request: one read is enough for a GET line; its content does not matter. */
	if (sys3(SYS_read, c, buf, SMALL) <= 0)
		fail("recv request", 0);
	for (i = 0; i < MIB; i++)
		buf[i] = (unsigned char)(i * 2654435761UL >> 24);
	num[d] = 0;
	do {
		num[--d] = (char)('0' + len % 10);
		len /= 10;
	} while (len);
	while (h1[n])
		hdr[n] = h1[n], n++;
	for (i = (u64)d; num[i]; i++)
		hdr[n++] = num[i];
	hdr[n++] = '\r', hdr[n++] = '\n', hdr[n++] = '\r', hdr[n++] = '\n';
	write_all((int)c, hdr, n);
	for (i = 0; i < mib; i++)
		write_all((int)c, buf, MIB);
	sys3(SYS_shutdown, c, SHUT_WR, 0);
	/* Wait for the peer to close: the data has then left the guest. */
	while (sys3(SYS_read, c, buf, SMALL) > 0)
		;
	report("served_bytes", "", mib * MIB);
	sys3(SYS_close, c, 0, 0);
	sys3(SYS_close, s, 0, 0);
}

static int is(const char *a, const char *b)
{
	while (*a && *a == *b)
		a++, b++;
	return *a == *b;
}

__attribute__((used, noreturn)) static void cmain(long *sp)
{
	long argc = sp[0];
	char **argv = (char **)(sp + 1);
	if (argc < 2)
		usage();
	if ((is(argv[1], "write") || is(argv[1], "read")) && argc == 4)
		seq(argv[2], number(argv[3]), is(argv[1], "write"));
	else if (is(argv[1], "randread") && argc == 5)
		randread(argv[2], number(argv[3]), number(argv[4]));
	else if (is(argv[1], "get") && argc == 6)
		get(argv[2], number(argv[3]), argv[4], argv[5]);
	else if (is(argv[1], "serve") && argc == 4)
		serve(number(argv[2]), number(argv[3]));
	else
		usage();
	quit(0);
}
