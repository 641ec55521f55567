/*
 * ember-vecregs: checks that guest processes neither corrupt nor read each other's vector and
 * extended registers, for every class this CPU has (found with CPUID and XGETBV, as any program
 * would): the upper halves of ymm0-15 (AVX), zmm0-31 with ymm/zmm16-31 and the opmask registers
 * k0-7 (AVX-512), and PKRU (protection keys).
 *
 *   ember-vecregs hold ID ROUNDS YIELDS   each round: load a pattern unique to (ID, round) into
 *                                         every register, sched_yield() YIELDS times, read them
 *                                         back; any difference is an error
 *   ember-vecregs fresh                   a new program must start with them all in their initial
 *                                         state (zero), whatever other processes left there
 *
 * Prints one "vecregs: ..." line (classes checked, errors) and exits 1 on any error, 2 on bad
 * usage. A value that carries another process's mark is reported as that process's: a leak.
 * Freestanding and built with -mgeneral-regs-only, so no code but the checks' own touches
 * these registers between exec and the first look. On software KVM the guest kernel cannot
 * switch this state (noxsave); Ember does (src/arch/x86_64/xstate.rs).
 */
#include "freestanding.h"

#define SYS_sched_yield 24

/* The mark in every pattern: its top byte, then the holder's ID (1..255). */
#define MARK 0x5eUL

struct classes {
	int avx;     /* ymm0-15 */
	int avx512;  /* zmm0-31, k0-7 */
	int kmovq;   /* 64-bit opmask moves (AVX512BW); else 16-bit (AVX512F) */
	int pkru;    /* RDPKRU/WRPKRU enabled for user mode (OSPKE) */
};

/* Register images: 32 zmm of 8 qwords, 8 opmask registers, PKRU. */
struct regs {
	u64 z[32][8];
	u64 k[8];
	u64 pkru;
};

static struct regs want, got;

static void cpuid(unsigned leaf, unsigned sub, unsigned *a, unsigned *b, unsigned *c, unsigned *d)
{
	asm volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(sub));
}

static struct classes detect(void)
{
	struct classes c = { 0, 0, 0, 0 };
	unsigned a, b, cx, d, max;

	cpuid(0, 0, &max, &b, &cx, &d);
	cpuid(1, 0, &a, &b, &cx, &d);
	if (!(cx & (1u << 27))) /* OSXSAVE: XGETBV usable, XCR0 meaningful */
		return c;
	unsigned lo, hi;
	asm volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
	c.avx = (cx & (1u << 28)) && (lo & 0x6) == 0x6;
	if (max >= 7) {
		cpuid(7, 0, &a, &b, &cx, &d);
		c.avx512 = c.avx && (b & (1u << 16)) && (lo & 0xe0) == 0xe0;
		c.kmovq = c.avx512 && (b & (1u << 30));
		c.pkru = !!(cx & (1u << 4));
	}
	return c;
}

/* A value no other (ID, round) produces and that is never zero. */
static u64 pattern(u64 id, u64 round, u64 reg, u64 q)
{
	return (MARK << 56) | (id << 48) | ((round & 0xffffff) << 24) | (reg << 8) | q;
}

static void fill(struct classes c, u64 id, u64 round)
{
	for (u64 r = 0; r < 32; r++)
		for (u64 q = 0; q < 8; q++)
			want.z[r][q] = pattern(id, round, r, q);
	for (u64 r = 0; r < 8; r++)
		want.k[r] = c.kmovq ? pattern(id, round, 32 + r, 0) : (id << 8 | (round & 0xff));
	/* The mark in the top byte, the ID below it; pkey 0 (bits 0-1), which every page uses,
	 * stays readable and writable. */
	want.pkru = (MARK << 24) | (id << 16) | ((round & 0xff) << 8);
}

#define REGS16 "0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15"
#define REGS32 REGS16 ",16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31"
#define KREGS "0,1,2,3,4,5,6,7"

/* Yields n times without touching a vector register (the syscall path is the kernel's). */
#define YIELD_LOOP                                                                           \
	"	test %%rdx, %%rdx\n"                                                         \
	"	jz 2f\n"                                                                     \
	"1:	mov $" "24" ", %%eax\n"                                                      \
	"	syscall\n"                                                                   \
	"	dec %%rdx\n"                                                                 \
	"	jnz 1b\n"                                                                    \
	"2:\n"

/*
 * Loads `want` into the registers of the classes present, yields, stores them into `got`, all
 * in one asm statement so that nothing runs in between but the kernel. `load` = 0 only stores.
 */
static void exercise(struct classes c, int load, u64 yields)
{
	const struct regs *in = &want;
	struct regs *out = &got;

	if (c.avx512) {
		if (load)
			asm volatile(".irp r," REGS32 "\n"
				     "	vmovdqu64 \\r*64(%0), %%zmm\\r\n"
				     ".endr\n" : : "r"(in->z) : "memory");
		if (load && c.kmovq)
			asm volatile(".irp r," KREGS "\n"
				     "	kmovq \\r*8(%0), %%k\\r\n"
				     ".endr\n" : : "r"(in->k) : "memory");
		else if (load)
			asm volatile(".irp r," KREGS "\n"
				     "	kmovw \\r*8(%0), %%k\\r\n"
				     ".endr\n" : : "r"(in->k) : "memory");
	} else if (c.avx && load) {
		asm volatile(".irp r," REGS16 "\n"
			     "	vmovdqu \\r*64(%0), %%ymm\\r\n"
			     ".endr\n" : : "r"(in->z) : "memory");
	}
	if (c.pkru && load)
		asm volatile("wrpkru" : : "a"((unsigned)in->pkru), "c"(0), "d"(0));

	asm volatile(YIELD_LOOP : "+d"(yields) : : "rax", "rcx", "r11", "memory");

	if (c.avx512) {
		asm volatile(".irp r," REGS32 "\n"
			     "	vmovdqu64 %%zmm\\r, \\r*64(%0)\n"
			     ".endr\n" : : "r"(out->z) : "memory");
		if (c.kmovq)
			asm volatile(".irp r," KREGS "\n"
				     "	kmovq %%k\\r, \\r*8(%0)\n"
				     ".endr\n" : : "r"(out->k) : "memory");
		else
			asm volatile(".irp r," KREGS "\n"
				     "	kmovw %%k\\r, \\r*8(%0)\n"
				     ".endr\n" : : "r"(out->k) : "memory");
	} else if (c.avx) {
		asm volatile(".irp r," REGS16 "\n"
			     "	vmovdqu %%ymm\\r, \\r*64(%0)\n"
			     ".endr\n" : : "r"(out->z) : "memory");
	}
	if (c.pkru) {
		unsigned pkru;
		asm volatile("rdpkru" : "=a"(pkru) : "c"(0) : "rdx");
		out->pkru = pkru;
	}
}

static char line[160];
static u64 line_len;

static void add(const char *s)
{
	while (*s && line_len < sizeof(line) - 2)
		line[line_len++] = *s++;
}

static void add_num(u64 v, int base)
{
	char buf[24];
	int n = 0;
	do {
		buf[n++] = "0123456789abcdef"[v % base];
		v /= base;
	} while (v);
	while (n)
		line[line_len < sizeof(line) - 2 ? line_len++ : line_len] = buf[--n];
}

static void flush(void)
{
	line[line_len++] = '\n';
	sys3(SYS_write, 1, line, line_len);
	line_len = 0;
}

static u64 errors, leaks, reported;

/* Compares one register value; names it on the console for the first few differences. */
static void check(const char *name, u64 index, u64 part, u64 value, u64 expected, u64 self,
		  u64 owner)
{
	if (value == expected)
		return;
	errors++;
	if (owner && owner != self)
		leaks++;
	if (reported++ >= 8)
		return;
	add("vecregs: ");
	add(name);
	add_num(index, 10);
	if (part != ~0UL) {
		add("[");
		add_num(part, 10);
		add("]");
	}
	add(" = 0x");
	add_num(value, 16);
	add(" want 0x");
	add_num(expected, 16);
	if (owner && owner != self) {
		add(" (process ");
		add_num(owner, 10);
		add("'s)");
	}
	flush();
}

/* Which holder a value came from, by its mark (0: none). */
static u64 owner_of(u64 value)
{
	return value >> 56 == MARK ? (value >> 48) & 0xff : 0;
}

/*
 * Compares `got` with `want`, or, when `fresh`, with the initial state: zero for the vector
 * and opmask registers. PKRU starts at whatever the kernel chose, so a fresh program only
 * checks that it carries no holder's mark.
 */
static void compare(struct classes c, u64 self, int fresh)
{
	u64 regs = c.avx512 ? 32 : c.avx ? 16 : 0;
	u64 qwords = c.avx512 ? 8 : 4;
	for (u64 r = 0; r < regs; r++)
		for (u64 q = 0; q < qwords; q++)
			check(c.avx512 ? "zmm" : "ymm", r, q, got.z[r][q],
			      fresh ? 0 : want.z[r][q], self, owner_of(got.z[r][q]));
	if (c.avx512) {
		u64 kmask = c.kmovq ? ~0UL : 0xffff;
		for (u64 r = 0; r < 8; r++)
			check("k", r, ~0UL, got.k[r] & kmask, fresh ? 0 : want.k[r] & kmask, self,
			      c.kmovq ? owner_of(got.k[r]) : 0);
	}
	if (c.pkru) {
		u64 owner = got.pkru >> 24 == MARK ? (got.pkru >> 16) & 0xff : 0;
		u64 expected = fresh ? (owner ? 0 : got.pkru) : want.pkru;
		check("pkru", 0, ~0UL, got.pkru, expected, self, owner);
	}
}

static u64 number(const char *s, int *ok)
{
	u64 v = 0;
	*ok = *s != 0;
	for (; *s; s++) {
		if (*s < '0' || *s > '9')
			*ok = 0;
		v = v * 10 + (u64)(*s - '0');
	}
	return v;
}

static void summary(struct classes c, const char *what, u64 id, u64 rounds)
{
	add("vecregs: ");
	add(what);
	if (id) {
		add(" id=");
		add_num(id, 10);
	}
	add(" classes=");
	add(c.avx512 ? "avx512(zmm0-31,k0-7)" : c.avx ? "avx(ymm0-15)" : "none");
	if (c.pkru)
		add("+pkru");
	add(" rounds=");
	add_num(rounds, 10);
	add(" errors=");
	add_num(errors, 10);
	add(" leaks=");
	add_num(leaks, 10);
	flush();
}

static __attribute__((used, noreturn)) void cmain(long *sp)
{
	long argc = sp[0];
	char **argv = (char **)(sp + 1);
	struct classes c = detect();
	int ok1 = 0, ok2 = 0, ok3 = 0;

	if (argc == 2 && argv[1][0] == 'f') {
		/* Nothing has loaded a register yet: look before anything else runs. */
		exercise(c, 0, 0);
		compare(c, 0, 1);
		summary(c, "fresh", 0, 1);
		quit(errors ? 1 : 0);
	}
	if (argc == 5 && argv[1][0] == 'h') {
		u64 id = number(argv[2], &ok1);
		u64 rounds = number(argv[3], &ok2);
		u64 yields = number(argv[4], &ok3);
		if (ok1 && ok2 && ok3 && id >= 1 && id <= 255) {
			for (u64 round = 0; round < rounds; round++) {
				fill(c, id, round);
				exercise(c, 1, yields);
				compare(c, id, 0);
			}
			summary(c, "hold", id, rounds);
			quit(errors ? 1 : 0);
		}
	}
	put(2, "usage: ember-vecregs hold ID(1-255) ROUNDS YIELDS | ember-vecregs fresh\n");
	quit(2);
}
