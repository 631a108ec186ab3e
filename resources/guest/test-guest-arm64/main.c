/*
 * Freestanding arm64 test guest: one fact per line on the 8250 UART, the boot-timer byte, the
 * command line from the device tree's /chosen/bootargs, secondary CPUs through PSCI CPU_ON, and
 * PSCI SYSTEM_RESET / SYSTEM_OFF to end. Runs at EL1 with the MMU off (every access is to
 * Device memory, so the code is built with -mstrict-align and never uses exclusives).
 * See docs/aarch64.md for the lines and keys.
 */
typedef unsigned char u8;
typedef unsigned int u32;
typedef unsigned long u64;
typedef unsigned long size_t;

/* Firecracker's arm64 device layout. */
#define BOOT_TIMER_ADDR 0x40000000UL
#define BOOT_TIMER_VALUE 123
#define UART_BASE 0x40002000UL

#define PSCI_CPU_OFF 0x84000002UL
#define PSCI_CPU_ON 0xc4000003UL
#define PSCI_SYSTEM_OFF 0x84000008UL
#define PSCI_SYSTEM_RESET 0x84000009UL

#define MAX_CPUS 8
#define MAX_VIRTIO 8

extern char secondary_entry[];

/* The compiler may call these for structure initialisation and copies. */
void *memset(void *dst, int c, size_t n)
{
	u8 *d = dst;
	while (n--)
		*d++ = (u8)c;
	return dst;
}

void *memcpy(void *dst, const void *src, size_t n)
{
	u8 *d = dst;
	const u8 *s = src;
	while (n--)
		*d++ = *s++;
	return dst;
}

static inline void mmio_write8(u64 addr, u8 v)
{
	*(volatile u8 *)addr = v;
}

static inline u8 mmio_read8(u64 addr)
{
	return *(volatile u8 *)addr;
}

static u64 psci(u64 fn, u64 a1, u64 a2, u64 a3)
{
	register u64 x0 __asm__("x0") = fn;
	register u64 x1 __asm__("x1") = a1;
	register u64 x2 __asm__("x2") = a2;
	register u64 x3 __asm__("x3") = a3;
	__asm__ volatile("hvc #0" : "+r"(x0) : "r"(x1), "r"(x2), "r"(x3) : "memory");
	return x0;
}

static u64 counter(void)
{
	u64 v;
	__asm__ volatile("isb; mrs %0, cntvct_el0" : "=r"(v));
	return v;
}

static u64 counter_hz(void)
{
	u64 v;
	__asm__ volatile("mrs %0, cntfrq_el0" : "=r"(v));
	return v;
}

/* ---- serial (8250 on MMIO, byte registers) ---- */

static void putc(char c)
{
	if (c == '\n')
		putc('\r');
	for (int i = 0; i < 100000 && !(mmio_read8(UART_BASE + 5) & 0x20); i++)
		;
	mmio_write8(UART_BASE, (u8)c);
}

static void puts(const char *s)
{
	while (*s)
		putc(*s++);
}

static void put_u64(u64 v, int base)
{
	char buf[24];
	int n = 0;
	do {
		u64 d = v % base;
		buf[n++] = (char)(d < 10 ? '0' + d : 'a' + d - 10);
		v /= base;
	} while (v);
	while (n)
		putc(buf[--n]);
}

static void put_hex(u64 v)
{
	puts("0x");
	put_u64(v, 16);
}

/* ---- the device tree ---- */

#define FDT_MAGIC 0xd00dfeed
#define FDT_BEGIN_NODE 1
#define FDT_END_NODE 2
#define FDT_PROP 3
#define FDT_NOP 4
#define FDT_END 9

static u32 be32(const u8 *p)
{
	return (u32)p[0] << 24 | (u32)p[1] << 16 | (u32)p[2] << 8 | p[3];
}

static u64 be64(const u8 *p)
{
	return (u64)be32(p) << 32 | be32(p + 4);
}

static size_t slen(const char *s)
{
	size_t n = 0;
	while (s[n])
		n++;
	return n;
}

static int prefix(const char *s, const char *p)
{
	while (*p)
		if (*s++ != *p++)
			return 0;
	return 1;
}

static int streq(const char *a, const char *b)
{
	while (*a && *a == *b)
		a++, b++;
	return *a == *b;
}

struct bootinfo {
	int valid;
	const char *cmdline;
	u32 cmdline_len;
	u64 mem_start, mem_size;
	u32 ncpus;
	u64 mpidr[MAX_CPUS];
	u32 nvirtio;
	u64 virtio_base[MAX_VIRTIO];
	u32 virtio_spi[MAX_VIRTIO];
};

static void fdt_parse(const u8 *fdt, struct bootinfo *bi)
{
	if (be32(fdt) != FDT_MAGIC)
		return;
	const u8 *structs = fdt + be32(fdt + 8);
	const char *strings = (const char *)fdt + be32(fdt + 12);
	const u8 *p = structs;
	const char *path[4] = { 0 };
	int depth = 0;

	bi->valid = 1;
	for (;;) {
		u32 token = be32(p);
		p += 4;
		if (token == FDT_BEGIN_NODE) {
			const char *name = (const char *)p;
			if (depth < 4)
				path[depth] = name;
			depth++;
			p += (slen(name) + 4) & ~3UL;
			if (depth == 3 && streq(path[1], "cpus") && prefix(name, "cpu@") &&
			    bi->ncpus < MAX_CPUS)
				bi->ncpus++;
		} else if (token == FDT_END_NODE) {
			depth--;
		} else if (token == FDT_PROP) {
			u32 len = be32(p);
			const char *pname = strings + be32(p + 4);
			const u8 *val = p + 8;
			p += 8 + ((len + 3) & ~3U);
			if (depth == 2 && streq(path[1], "chosen") && streq(pname, "bootargs")) {
				bi->cmdline = (const char *)val;
				bi->cmdline_len = len ? len - 1 : 0;
			} else if (depth == 2 && prefix(path[1], "memory") && streq(pname, "reg") &&
				   len >= 16) {
				bi->mem_start = be64(val);
				bi->mem_size = be64(val + 8);
			} else if (depth == 2 && prefix(path[1], "virtio_mmio@") &&
				   bi->nvirtio < MAX_VIRTIO && streq(pname, "reg") && len >= 16) {
				bi->virtio_base[bi->nvirtio++] = be64(val);
			} else if (depth == 2 && prefix(path[1], "virtio_mmio@") && bi->nvirtio > 0 &&
				   streq(pname, "interrupts") && len >= 12) {
				bi->virtio_spi[bi->nvirtio - 1] = be32(val + 4);
			} else if (depth == 3 && streq(path[1], "cpus") && streq(pname, "reg") &&
				   bi->ncpus > 0) {
				bi->mpidr[bi->ncpus - 1] = len >= 8 ? be64(val) : be32(val);
			}
		} else if (token == FDT_NOP) {
			continue;
		} else {
			break;
		}
	}
}

/* ---- options ---- */

enum exit_mode { EXIT_REBOOT, EXIT_HALT, EXIT_POWEROFF };

struct opts {
	int timer, smp, quiet, virtio;
	u64 count, smp_timeout_ms, delay_ms;
	enum exit_mode exit;
};

static int key_is(const char *tok, size_t klen, const char *key)
{
	size_t n = slen(key);
	return klen == n && prefix(tok, key);
}

static u64 parse_num(const char *s, size_t len)
{
	u64 v = 0;
	for (size_t i = 0; i < len && s[i] >= '0' && s[i] <= '9'; i++)
		v = v * 10 + (u64)(s[i] - '0');
	return v;
}

static void opts_parse(const char *s, u32 len, struct opts *o)
{
	o->timer = 1;
	o->smp = 1;
	o->quiet = 0;
	o->virtio = 0;
	o->count = 0;
	o->delay_ms = 0;
	o->smp_timeout_ms = 1000;
	o->exit = EXIT_REBOOT;
	u32 i = 0;
	while (i < len) {
		while (i < len && s[i] == ' ')
			i++;
		u32 start = i;
		while (i < len && s[i] != ' ')
			i++;
		const char *tok = s + start;
		u32 tlen = i - start, k = 0;
		while (k < tlen && tok[k] != '=')
			k++;
		if (k == tlen)
			continue;
		const char *val = tok + k + 1;
		size_t vlen = tlen - k - 1;
		if (key_is(tok, k, "tg.timer"))
			o->timer = parse_num(val, vlen) != 0;
		else if (key_is(tok, k, "tg.smp"))
			o->smp = parse_num(val, vlen) != 0;
		else if (key_is(tok, k, "tg.virtio"))
			o->virtio = parse_num(val, vlen) != 0;
		else if (key_is(tok, k, "tg.quiet"))
			o->quiet = parse_num(val, vlen) != 0;
		else if (key_is(tok, k, "tg.count"))
			o->count = parse_num(val, vlen);
		else if (key_is(tok, k, "tg.delay_ms"))
			o->delay_ms = parse_num(val, vlen);
		else if (key_is(tok, k, "tg.smp_timeout_ms"))
			o->smp_timeout_ms = parse_num(val, vlen);
		else if (key_is(tok, k, "tg.exit") && vlen == 4 && prefix(val, "halt"))
			o->exit = EXIT_HALT;
		else if (key_is(tok, k, "tg.exit") && vlen == 8 && prefix(val, "poweroff"))
			o->exit = EXIT_POWEROFF;
		else if (key_is(tok, k, "tg.exit"))
			o->exit = EXIT_REBOOT;
	}
}

/* Where the early command line is looked up for tg.timer=0 before anything else. */
static int timer_disabled(const u8 *fdt)
{
	struct bootinfo bi = { 0 };
	struct opts o;
	fdt_parse(fdt, &bi);
	if (!bi.cmdline)
		return 0;
	opts_parse(bi.cmdline, bi.cmdline_len, &o);
	return !o.timer;
}

/* ---- SMP ---- */

/* Set by each secondary CPU to its MPIDR + 1 (plain stores: no exclusives with the MMU off). */
static volatile u64 cpu_arrived[MAX_CPUS];

void tg_secondary(u64 index)
{
	u64 mpidr;
	__asm__ volatile("mrs %0, mpidr_el1" : "=r"(mpidr));
	if (index < MAX_CPUS)
		cpu_arrived[index] = (mpidr & 0xffffff) + 1;
	psci(PSCI_CPU_OFF, 0, 0, 0);
}

static void smp_boot(const struct bootinfo *bi, const struct opts *o)
{
	u32 online = 1;

	if (bi->ncpus > 1 && !o->smp) {
		if (!o->quiet)
			puts("smp: skipped\n");
		return;
	}
	for (u32 i = 1; i < bi->ncpus; i++) {
		u64 rc = psci(PSCI_CPU_ON, bi->mpidr[i], (u64)secondary_entry, i);
		if (rc != 0 && !o->quiet) {
			puts("smp: cpu_on failed cpu=");
			put_u64(i, 10);
			puts(" rc=");
			put_u64(rc, 10);
			puts("\n");
		}
	}
	u64 deadline = counter() + counter_hz() / 1000 * o->smp_timeout_ms;
	for (u32 i = 1; i < bi->ncpus; i++) {
		while (!cpu_arrived[i] && counter() < deadline)
			;
		if (cpu_arrived[i])
			online++;
	}
	if (o->quiet)
		return;
	puts("smp: online=");
	put_u64(online, 10);
	puts("/");
	put_u64(bi->ncpus ? bi->ncpus : 1, 10);
	puts(" mpidrs=0");
	for (u32 i = 1; i < bi->ncpus; i++) {
		if (cpu_arrived[i]) {
			puts(",");
			put_u64(cpu_arrived[i] - 1, 16);
		}
	}
	puts("\n");
}

/* ---- virtio-mmio: list the devices the device tree names, read their identity ---- */

static inline u32 mmio_read32(u64 addr)
{
	return *(volatile u32 *)addr;
}

static void virtio_list(const struct bootinfo *bi)
{
	puts("virtio: ");
	put_u64(bi->nvirtio, 10);
	puts(" devices\n");
	for (u32 i = 0; i < bi->nvirtio; i++) {
		u64 base = bi->virtio_base[i];
		u32 magic = mmio_read32(base);
		puts("virtio: base=");
		put_hex(base);
		puts(" spi=");
		put_u64(bi->virtio_spi[i], 10);
		puts(magic == 0x74726976 ? " magic=ok" : " magic=bad");
		puts(" version=");
		put_u64(mmio_read32(base + 4), 10);
		puts(" device=");
		put_u64(mmio_read32(base + 8), 10);
		puts("\n");
	}
}

/* ---- main ---- */

static struct bootinfo bi;
static struct opts opts;

static void __attribute__((noreturn)) finish(void)
{
	puts("testguest: done\n");
	switch (opts.exit) {
	case EXIT_HALT:
		for (;;)
			__asm__ volatile("msr daifset, #0xf; wfi");
	case EXIT_POWEROFF:
		psci(PSCI_SYSTEM_OFF, 0, 0, 0);
		break;
	case EXIT_REBOOT:
	default:
		psci(PSCI_SYSTEM_RESET, 0, 0, 0);
		break;
	}
	puts("testguest: psci returned\n");
	for (;;)
		__asm__ volatile("wfi");
}

void tg_main(const u8 *fdt)
{
	if (!timer_disabled(fdt))
		mmio_write8(BOOT_TIMER_ADDR, BOOT_TIMER_VALUE);

	fdt_parse(fdt, &bi);
	if (bi.cmdline)
		opts_parse(bi.cmdline, bi.cmdline_len, &opts);
	else
		opts_parse("", 0, &opts);

	if (!opts.quiet) {
		puts("testguest: start protocol=arm64\n");
		if (!bi.valid) {
			puts("fdt: invalid addr=");
			put_hex((u64)fdt);
			puts("\n");
		}
		puts("cmdline: ");
		for (u32 i = 0; i < bi.cmdline_len; i++) {
			char c = bi.cmdline[i];
			putc(c >= 0x20 && c < 0x7f ? c : '?');
		}
		puts("\nmemory: ");
		put_hex(bi.mem_start);
		puts("-");
		put_hex(bi.mem_start + bi.mem_size);
		puts("\nmem: usable=");
		put_u64(bi.mem_size / 1024, 10);
		puts(" KiB\ncpus: ");
		put_u64(bi.ncpus, 10);
		puts("\n");
	}
	smp_boot(&bi, &opts);
	if (opts.virtio)
		virtio_list(&bi);
	for (u64 i = 1; i <= opts.count; i++) {
		if (i > 1 && opts.delay_ms) {
			u64 until = counter() + counter_hz() / 1000 * opts.delay_ms;
			while (counter() < until)
				;
		}
		puts("count: ");
		put_u64(i, 10);
		puts("\n");
	}
	finish();
}
