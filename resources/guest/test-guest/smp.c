/*
 * Multiprocessor start-up: find the Intel MP table the VMM built, then wake every
 * enabled AP with INIT / SIPI / SIPI through the xAPIC and count who arrives.
 */
#include "tg.h"

#define MP_FP_SIG 0x5f504d5fU	/* "_MP_" */
#define MP_CFG_SIG 0x504d4350U	/* "PCMP" */
#define MP_CFG_HDR_LEN 0x2c
#define MP_ENTRY_PROCESSOR 0
#define MP_PROC_ENABLED 0x01
#define MP_PROC_BSP 0x02

#define BDA_EBDA_SEG 0x40e
#define BDA_BASE_MEM_KB 0x413

#define MSR_APIC_BASE 0x1b
#define APIC_BASE_ENABLE (1UL << 11)
#define APIC_BASE_X2APIC (1UL << 10)

#define ICR_INIT 0x00004500	/* INIT, level assert */
#define ICR_STARTUP 0x00004600	/* start-up IPI, vector in bits 0-7 */
#define ICR_BUSY (1U << 12)	/* delivery status */
#define ICR_POLL_LIMIT 1000000

/* Written by the APs (trampoline.S). */
volatile u32 ap_next_slot;
volatile u32 ap_online;
volatile u32 ap_apic_ids[MAX_CPUS];

extern const u8 ap_tramp_start[], ap_tramp_end[];
extern const u8 __image_start[], __image_end[];

static u8 sum8(u64 addr, u64 len)
{
	const volatile u8 *p = phys(addr);
	u8 s = 0;
	for (u64 i = 0; i < len; i++)
		s = (u8)(s + p[i]);
	return s;
}

static u64 scan_fp(u64 start, u64 len)
{
	u64 end = start + len;
	for (u64 a = (start + 15) & ~15UL; a + 16 <= end; a += 16) {
		if (*(const volatile u32 *)phys(a) != MP_FP_SIG)
			continue;
		u64 flen = (u64)*(const volatile u8 *)phys(a + 8) * 16;
		if (flen >= 16 && sum8(a, flen) == 0)
			return a;
	}
	return 0;
}

static void parse_cfg(struct mp_info *mp, u64 cfg)
{
	if (!phys_ok(cfg, MP_CFG_HDR_LEN) || *(const volatile u32 *)phys(cfg) != MP_CFG_SIG)
		return;
	u32 len = *(const volatile u16 *)phys(cfg + 4);
	if (len < MP_CFG_HDR_LEN || !phys_ok(cfg, len) || sum8(cfg, len) != 0)
		return;

	mp->found = 1;
	mp->cfg_addr = cfg;
	mp->cfg_len = len;

	/*
	 * Walk the entries by the table length, as Linux does: some firmware (qboot)
	 * leaves the entry count at 0x22 zero.
	 */
	const volatile u8 *p = phys(cfg + MP_CFG_HDR_LEN);
	const volatile u8 *end = phys(cfg + len);
	while (p < end) {
		if (p[0] == MP_ENTRY_PROCESSOR) {
			if (p + 20 > end)
				break;
			if ((p[3] & MP_PROC_ENABLED) && mp->ncpus < MAX_CPUS)
				mp->apic_ids[mp->ncpus++] = p[1];
			p += 20;
		} else if (p[0] <= 4) {
			p += 8; /* bus, I/O APIC, I/O interrupt, local interrupt */
		} else {
			break;
		}
	}
}

void mptable_find(struct mp_info *mp)
{
	memset(mp, 0, sizeof(*mp));

	u64 fp = 0;
	u64 ebda = (u64)*(const volatile u16 *)phys(BDA_EBDA_SEG) << 4;
	u64 base_kb = *(const volatile u16 *)phys(BDA_BASE_MEM_KB);

	if (ebda >= 0x400 && ebda < 0xa0000)
		fp = scan_fp(ebda, 1024);
	if (!fp && base_kb >= 2 && base_kb <= 640 && base_kb * 1024 - 1024 != 0x9fc00)
		fp = scan_fp(base_kb * 1024 - 1024, 1024);
	if (!fp)
		fp = scan_fp(0x9fc00, 1024);
	if (!fp)
		fp = scan_fp(0xf0000, 0x10000);
	if (!fp)
		return;

	mp->fp_addr = fp;
	u8 default_cfg = *(const volatile u8 *)phys(fp + 11);
	u32 cfg = *(const volatile u32 *)phys(fp + 4);
	if (default_cfg == 0 && cfg)
		parse_cfg(mp, cfg);
}

/* ---- AP start-up ---- */

static u64 rdmsr(u32 msr)
{
	u32 lo, hi;
	__asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
	return ((u64)hi << 32) | lo;
}

static void wrmsr(u32 msr, u64 v)
{
	__asm__ volatile("wrmsr" : : "c"(msr), "a"((u32)v), "d"((u32)(v >> 32)));
}

static u32 lapic_read(u32 reg)
{
	return mmio_read32(LAPIC_BASE + reg);
}

static void lapic_write(u32 reg, u32 v)
{
	mmio_write32(LAPIC_BASE + reg, v);
}

static void send_ipi(u32 apic_id, u32 icr_low)
{
	lapic_write(LAPIC_ICR_HIGH, apic_id << 24);
	lapic_write(LAPIC_ICR_LOW, icr_low);
	for (int i = 0; i < ICR_POLL_LIMIT && (lapic_read(LAPIC_ICR_LOW) & ICR_BUSY); i++)
		cpu_relax();
}

static int overlaps(u64 a, u64 alen, u64 b, u64 blen)
{
	return a < b + blen && b < a + alen;
}

static int page_is_free(const struct bootinfo *bi, const struct mp_info *mp, u64 page)
{
	int usable = bi->nr_mem == 0; /* no map: assume low memory is RAM */
	for (u32 i = 0; i < bi->nr_mem; i++) {
		const struct mem_entry *e = &bi->mem[i];
		if (e->type == 1 && e->addr <= page && page + 0x1000 <= e->addr + e->size)
			usable = 1;
	}
	if (!usable)
		return 0;
	for (u32 i = 0; i < bi->nr_reserved; i++)
		if (overlaps(page, 0x1000, bi->reserved[i].start,
			     bi->reserved[i].end - bi->reserved[i].start))
			return 0;
	if (mp->fp_addr && overlaps(page, 0x1000, mp->fp_addr, 16))
		return 0;
	if (mp->cfg_addr && overlaps(page, 0x1000, mp->cfg_addr, mp->cfg_len))
		return 0;
	if (overlaps(page, 0x1000, (u64)__image_start, (u64)(__image_end - __image_start)))
		return 0;
	return 1;
}

/* A free page below 1 MiB for the trampoline (page 0 holds the IVT and BDA). */
static u64 pick_trampoline(const struct bootinfo *bi, const struct mp_info *mp)
{
	if (page_is_free(bi, mp, AP_TRAMPOLINE_PREFERRED))
		return AP_TRAMPOLINE_PREFERRED;
	for (u64 page = 0x1000; page < 0x9f000; page += 0x1000)
		if (page_is_free(bi, mp, page))
			return page;
	return 0;
}

static void sort_u32(u32 *v, u32 n)
{
	for (u32 i = 1; i < n; i++) {
		u32 x = v[i], j = i;
		for (; j > 0 && v[j - 1] > x; j--)
			v[j] = v[j - 1];
		v[j] = x;
	}
}

static void print_ids(const u32 *ids, u32 n)
{
	for (u32 i = 0; i < n; i++)
		tg_info(i ? ",%u" : "%u", ids[i]);
}

void smp_boot(struct bootinfo *bi, const struct mp_info *mp, const struct tg_opts *o)
{
	if (!mp->found || mp->ncpus <= 1) {
		tg_info("smp: online=1/1\n");
		return;
	}
	if (!o->smp) {
		tg_info("smp: skipped\n");
		return;
	}

	u64 apic_base = rdmsr(MSR_APIC_BASE);
	if (apic_base & APIC_BASE_X2APIC) {
		tg_info("smp: error=x2apic-mode\n");
		return;
	}
	if (!(apic_base & APIC_BASE_ENABLE))
		wrmsr(MSR_APIC_BASE, apic_base | APIC_BASE_ENABLE);
	lapic_write(LAPIC_SVR, lapic_read(LAPIC_SVR) | 0x1ff); /* enable, spurious vector 0xff */
	u32 bsp_id = lapic_read(LAPIC_ID) >> 24;

	u64 tramp = pick_trampoline(bi, mp);
	if (!tramp) {
		tg_info("smp: error=no-trampoline-page\n");
		return;
	}
	memcpy((void *)tramp, ap_tramp_start, (size_t)(ap_tramp_end - ap_tramp_start));

	ap_next_slot = 0;
	ap_online = 0;
	for (u32 i = 0; i < MAX_CPUS; i++)
		ap_apic_ids[i] = ~0U;
	barrier();

	u32 expected_aps = 0;
	for (u32 i = 0; i < mp->ncpus; i++) {
		if (mp->apic_ids[i] == bsp_id)
			continue;
		send_ipi(mp->apic_ids[i], ICR_INIT);
		expected_aps++;
	}
	/* The SDM asks for 10 ms after INIT; virtual CPUs need no settling time. */
	delay_us(is_hypervisor() ? 100 : 10000);
	for (int round = 0; round < 2; round++) {
		for (u32 i = 0; i < mp->ncpus; i++)
			if (mp->apic_ids[i] != bsp_id)
				send_ipi(mp->apic_ids[i], ICR_STARTUP | (u32)(tramp >> 12));
		delay_us(200);
	}

	u64 limit = o->smp_timeout_ms * tsc_khz();
	u64 start = rdtsc();
	while (ap_online < expected_aps && rdtsc() - start < limit)
		cpu_relax();
	barrier();

	u32 ids[MAX_CPUS + 1];
	u32 n = 0;
	ids[n++] = bsp_id;
	for (u32 i = 0; i < MAX_CPUS; i++)
		if (ap_apic_ids[i] != ~0U)
			ids[n++] = ap_apic_ids[i];
	sort_u32(ids, n);

	tg_info("smp: online=%u/%u apic_ids=", 1 + ap_online, mp->ncpus);
	print_ids(ids, n);
	tg_info("\n");
}

void mptable_print(const struct mp_info *mp)
{
	if (!mp->found) {
		tg_info("mptable: none\n");
		return;
	}
	tg_info("mptable: cpus=%u apic_ids=", mp->ncpus);
	for (u32 i = 0; i < mp->ncpus; i++)
		tg_info(i ? ",%u" : "%u", mp->apic_ids[i]);
	tg_info("\n");
}
