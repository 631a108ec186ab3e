/*
 * Freestanding arm64 test guest: one fact per line on the 8250 UART, the boot-timer byte, the
 * command line from the device tree's /chosen/bootargs, secondary CPUs through PSCI CPU_ON, the
 * virtio-mmio devices the device tree names (with the drivers of ../test-guest: virtio-blk,
 * virtio-net and entropy, the same tg.* keys as on x86_64), and PSCI SYSTEM_RESET
 * / SYSTEM_OFF to end. Runs at EL1 with the MMU on (start.S: an identity map, RAM write-back
 * cacheable, devices Device-nGnRnE), polling, without interrupts. See docs/aarch64.md for the
 * lines and keys.
 */
#include "tg.h"

#define PSCI_CPU_OFF 0x84000002UL
#define PSCI_CPU_ON 0xc4000003UL
#define PSCI_SYSTEM_OFF 0x84000008UL
#define PSCI_SYSTEM_RESET 0x84000009UL

extern char secondary_entry[];

static u64 psci(u64 fn, u64 a1, u64 a2, u64 a3)
{
	register u64 x0 __asm__("x0") = fn;
	register u64 x1 __asm__("x1") = a1;
	register u64 x2 __asm__("x2") = a2;
	register u64 x3 __asm__("x3") = a3;
	__asm__ volatile("hvc #0" : "+r"(x0) : "r"(x1), "r"(x2), "r"(x3) : "memory");
	return x0;
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

struct fdt_info {
	int valid;
	const char *cmdline;
	u32 cmdline_len;
	u64 mem_start, mem_size;
	u32 ncpus;
	u64 mpidr[MAX_CPUS];
	u32 nvirtio;
	u64 virtio_base[MAX_VIRTIO_SLOTS];
	u64 virtio_size[MAX_VIRTIO_SLOTS];
	u32 virtio_spi[MAX_VIRTIO_SLOTS];
};

static void fdt_parse(const u8 *fdt, struct fdt_info *bi)
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
			p += (strlen(name) + 4) & ~3UL;
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
				   bi->nvirtio < MAX_VIRTIO_SLOTS && streq(pname, "reg") && len >= 16) {
				bi->virtio_base[bi->nvirtio] = be64(val);
				bi->virtio_size[bi->nvirtio++] = be64(val + 8);
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

/* tg.timer=0 is looked up before anything else, so that the boot-timer write comes first. */
static int timer_disabled(const u8 *fdt)
{
	struct fdt_info bi = { 0 };
	fdt_parse(fdt, &bi);
	return bi.cmdline && opts_timer_disabled(bi.cmdline, bi.cmdline_len);
}

/* ---- SMP ---- */

/* Set by each secondary CPU to its MPIDR + 1. */
static volatile u64 cpu_arrived[MAX_CPUS];

void tg_secondary(u64 index)
{
	u64 mpidr;
	__asm__ volatile("mrs %0, mpidr_el1" : "=r"(mpidr));
	if (index < MAX_CPUS)
		__atomic_store_n(&cpu_arrived[index], (mpidr & 0xffffff) + 1, __ATOMIC_RELEASE);
	psci(PSCI_CPU_OFF, 0, 0, 0);
}

static void psci_smp_boot(const struct fdt_info *bi, const struct tg_opts *o)
{
	u32 online = 1;

	if (bi->ncpus > 1 && !o->smp) {
		tg_info("smp: skipped\n");
		return;
	}
	for (u32 i = 1; i < bi->ncpus; i++) {
		u64 rc = psci(PSCI_CPU_ON, bi->mpidr[i], (u64)secondary_entry, i);
		if (rc != 0)
			tg_info("smp: cpu_on failed cpu=%u rc=%lu\n", i, rc);
	}
	u64 deadline = tsc_deadline_us(o->smp_timeout_ms * 1000);
	for (u32 i = 1; i < bi->ncpus; i++) {
		while (!__atomic_load_n(&cpu_arrived[i], __ATOMIC_ACQUIRE) && !tsc_passed(deadline))
			cpu_relax();
		if (cpu_arrived[i])
			online++;
	}
	if (tg_quiet)
		return;
	tg_printf("smp: online=%u/%u mpidrs=0", online, bi->ncpus ? bi->ncpus : 1);
	for (u32 i = 1; i < bi->ncpus; i++)
		if (cpu_arrived[i])
			tg_printf(",%lx", cpu_arrived[i] - 1);
	tg_printf("\n");
}

/* ---- main ---- */

static struct fdt_info bi;
/* opts_parse() sets every field (virtio_slots[] up to nr_virtio). */
static struct tg_opts opts NOINIT;

static void __attribute__((noreturn)) finish(void)
{
	switch (opts.exit_mode) {
	case EXIT_HALT:
		tg_printf("testguest: done\n");
		for (;;)
			__asm__ volatile("msr daifset, #0xf; wfi");
	case EXIT_POWEROFF:
		tg_printf("testguest: done\n");
		psci(PSCI_SYSTEM_OFF, 0, 0, 0);
		break;
	case EXIT_FAULT:
		/* No triple fault on arm64: an exception without vectors loops in the guest. */
		tg_printf("testguest: fault unsupported on arm64, resetting\n");
		psci(PSCI_SYSTEM_RESET, 0, 0, 0);
		break;
	case EXIT_REBOOT:
	default:
		tg_printf("testguest: done\n");
		psci(PSCI_SYSTEM_RESET, 0, 0, 0);
		break;
	}
	tg_printf("testguest: psci returned\n");
	for (;;)
		__asm__ volatile("wfi");
}

/* The device tree's virtio-mmio nodes stand in for x86's virtio_mmio.device= entries. */
static void virtio_slots_from_fdt(void)
{
	opts.nr_virtio = bi.nvirtio;
	for (u32 i = 0; i < bi.nvirtio; i++) {
		opts.virtio_slots[i].base = bi.virtio_base[i];
		opts.virtio_slots[i].size = bi.virtio_size[i];
		opts.virtio_slots[i].irq = bi.virtio_spi[i];
	}
}

void tg_main(const u8 *fdt)
{
	if (!timer_disabled(fdt))
		mmio_write8(BOOT_TIMER_ADDR, BOOT_TIMER_VALUE);

	fdt_parse(fdt, &bi);
	opts_parse(bi.cmdline ? bi.cmdline : "", bi.cmdline ? bi.cmdline_len : 0, &opts);
	tg_quiet = opts.quiet;
	virtio_slots_from_fdt();

	serial_init();
	tg_info("testguest: start protocol=arm64\n");
	if (!bi.valid)
		tg_info("fdt: invalid addr=0x%lx\n", (u64)fdt);
	if (!tg_quiet) {
		tg_printf("cmdline: ");
		for (u32 i = 0; i < bi.cmdline_len; i++) {
			char c = bi.cmdline[i];
			serial_putc(c >= 0x20 && c < 0x7f ? c : '?');
		}
		tg_printf("\n");
	}
	tg_info("memory: 0x%lx-0x%lx\n", bi.mem_start, bi.mem_start + bi.mem_size);
	tg_info("mem: usable=%lu KiB\n", bi.mem_size / 1024);
	tg_info("cpus: %u\n", bi.ncpus);
	psci_smp_boot(&bi, &opts);

	tg_devices(&opts, bi.mem_size);
	tg_count(&opts);
	tg_devices_late(&opts);
	if (opts.echo)
		tg_echo();
	if (opts.kbd)
		tg_printf("kbd: none on arm64\n");
	finish();
}
