/*
 * Busy-wait delays on the TSC. The TSC frequency comes, in this order, from the
 * hypervisor timing leaf (CPUID 0x40000010), KVM's paravirtual clock, CPUID leaf 0x15,
 * a short measurement against PIT channel 2, CPUID leaf 0x16, or else an assumed 2 GHz.
 * Precision does not matter for the waits, which are all bounded; the virtio-blk
 * benchmark prints the frequency and its source next to its timings.
 */
#include "tg.h"

#define PIT_HZ 1193182UL
#define PIT_CAL_MS 10UL
#define PIT_CAL_LATCH (PIT_HZ * PIT_CAL_MS / 1000)
#define PIT_POLL_LIMIT 2000000UL
#define TSC_KHZ_FALLBACK 2000000UL
#define TSC_KHZ_MIN 100000UL	/* 100 MHz */
#define TSC_KHZ_MAX 10000000UL	/* 10 GHz */

static u64 cached_khz;
static const char *khz_source;
static int khz_reported;

static int plausible(u64 khz)
{
	return khz >= TSC_KHZ_MIN && khz <= TSC_KHZ_MAX;
}

int is_hypervisor(void)
{
	u32 a, b, c, d;
	cpuid(1, 0, &a, &b, &c, &d);
	return (c >> 31) & 1;
}

static u64 khz_from_hypervisor_leaf(void)
{
	u32 a, b, c, d;

	if (!is_hypervisor())
		return 0;
	/* Hypervisor timing leaf (VMware convention, also offered by QEMU): EAX = TSC kHz. */
	cpuid(0x40000000, 0, &a, &b, &c, &d);
	if (a >= 0x40000010 && a < 0x40000100) {
		cpuid(0x40000010, 0, &a, &b, &c, &d);
		if (plausible(a))
			return a;
	}
	return 0;
}

/* KVM paravirtual clock (Documentation/virt/kvm/x86/msr.rst). */
#define KVM_CPUID_SIGNATURE 0x40000000
#define KVM_CPUID_FEATURES 0x40000001
#define KVM_FEATURE_CLOCKSOURCE (1U << 0)
#define KVM_FEATURE_CLOCKSOURCE2 (1U << 3)
#define MSR_KVM_SYSTEM_TIME 0x12
#define MSR_KVM_SYSTEM_TIME_NEW 0x4b564d01

struct pvclock_vcpu_time_info {
	u32 version;
	u32 pad0;
	u64 tsc_timestamp;
	u64 system_time;
	u32 tsc_to_system_mul;
	signed char tsc_shift;
	u8 flags;
	u8 pad[2];
};

static struct pvclock_vcpu_time_info pvclock __attribute__((aligned(64)));

static void wrmsr(u32 msr, u64 v)
{
	__asm__ volatile("wrmsr" : : "c"(msr), "a"((u32)v), "d"((u32)(v >> 32)) : "memory");
}

static u64 khz_from_kvmclock(void)
{
	u32 a, b, c, d, msr;

	if (!is_hypervisor())
		return 0;
	cpuid(KVM_CPUID_SIGNATURE, 0, &a, &b, &c, &d);
	if (b != 0x4b4d564b || c != 0x564b4d56 || d != 0x4d) /* "KVMKVMKVM\0\0\0" */
		return 0;
	cpuid(KVM_CPUID_FEATURES, 0, &a, &b, &c, &d);
	if (a & KVM_FEATURE_CLOCKSOURCE2)
		msr = MSR_KVM_SYSTEM_TIME_NEW;
	else if (a & KVM_FEATURE_CLOCKSOURCE)
		msr = MSR_KVM_SYSTEM_TIME;
	else
		return 0;

	volatile struct pvclock_vcpu_time_info *p = &pvclock;
	p->version = 0;
	wrmsr(msr, (u64)&pvclock | 1); /* enable; KVM fills the structure */
	u32 mul = 0;
	int shift = 0;
	for (int i = 0; i < 1000; i++) {
		u32 v = p->version;
		barrier();
		mul = p->tsc_to_system_mul;
		shift = p->tsc_shift;
		barrier();
		if (v && !(v & 1) && v == p->version)
			break;
		mul = 0;
	}
	wrmsr(msr, 0); /* stop the updates */
	if (!mul)
		return 0;

	/* ns = ((tsc << shift) * mul) >> 32, so kHz = (10^6 << 32) / mul >> shift. */
	u64 khz = (1000000UL << 32) / mul;
	if (shift > 0)
		khz >>= shift;
	else if (shift < 0)
		khz <<= -shift;
	return plausible(khz) ? khz : 0;
}

static u64 khz_from_cpuid_15(void)
{
	u32 a, b, c, d, max;

	cpuid(0, 0, &max, &b, &c, &d);
	if (max < 0x15)
		return 0;
	cpuid(0x15, 0, &a, &b, &c, &d); /* TSC/crystal ratio b/a, crystal c Hz */
	if (!a || !b || !c)
		return 0;
	u64 khz = (u64)c / 1000 * b / a;
	return plausible(khz) ? khz : 0;
}

static u64 khz_from_cpuid_16(void)
{
	u32 a, b, c, d, max;

	cpuid(0, 0, &max, &b, &c, &d);
	if (max < 0x16)
		return 0;
	cpuid(0x16, 0, &a, &b, &c, &d); /* base frequency, MHz */
	u64 khz = (u64)(a & 0xffff) * 1000;
	return plausible(khz) ? khz : 0;
}

static u64 khz_from_pit(void)
{
	u8 saved = inb(0x61);
	u64 polls = 0;

	outb(0x61, (u8)((saved & ~0x02) | 0x01));	/* gate 2 on, speaker off */
	outb(0x43, 0xb0);				/* ch 2, lo/hi byte, mode 0 */
	outb(0x42, PIT_CAL_LATCH & 0xff);
	outb(0x42, PIT_CAL_LATCH >> 8);
	u64 t0 = rdtsc();
	while (!(inb(0x61) & 0x20)) {			/* OUT2 goes high at terminal count */
		if (++polls > PIT_POLL_LIMIT)
			break;
	}
	u64 t1 = rdtsc();
	outb(0x61, saved);

	if (polls == 0 || polls > PIT_POLL_LIMIT)
		return 0; /* no PIT answering on port 0x61 */
	u64 khz = (t1 - t0) / PIT_CAL_MS;
	return plausible(khz) ? khz : 0;
}

u64 tsc_khz(void)
{
	if (!cached_khz) {
		const char *src = "hypervisor-leaf";
		u64 khz = khz_from_hypervisor_leaf();
		if (!khz) {
			src = "kvmclock";
			khz = khz_from_kvmclock();
		}
		if (!khz) {
			src = "cpuid-15";
			khz = khz_from_cpuid_15();
		}
		if (!khz) {
			src = "pit";
			khz = khz_from_pit();
		}
		if (!khz) {
			src = "cpuid-16";
			khz = khz_from_cpuid_16();
		}
		if (!khz) {
			src = "assumed";
			khz = TSC_KHZ_FALLBACK;
		}
		khz_source = src;
		cached_khz = khz;
	}
	return cached_khz;
}

/* Where tsc_khz() got its value: hypervisor-leaf, kvmclock, cpuid-15, pit, cpuid-16, assumed. */
const char *tsc_source(void)
{
	tsc_khz();
	return khz_source;
}

/* Print "tsc: khz=<n> source=<s>" the first time it is called. */
void tsc_report(void)
{
	if (khz_reported)
		return;
	khz_reported = 1;
	u64 khz = tsc_khz();
	tg_printf("tsc: khz=%lu source=%s\n", khz, khz_source);
}

/* TSC value after us microseconds from now; see tsc_passed(). */
u64 tsc_deadline_us(u64 us)
{
	return rdtsc() + us * tsc_khz() / 1000;
}

int tsc_passed(u64 deadline)
{
	return (i64)(rdtsc() - deadline) >= 0;
}

u64 tsc_cycles_to_us(u64 cycles)
{
	u64 khz = tsc_khz();
	/* cycles * 1000 / khz without overflowing for long intervals */
	return cycles / khz * 1000 + cycles % khz * 1000 / khz;
}

void delay_us(u64 us)
{
	u64 cycles = us * tsc_khz() / 1000;
	u64 start = rdtsc();
	while (rdtsc() - start < cycles)
		cpu_relax();
}

void delay_ms(u64 ms)
{
	delay_us(ms * 1000);
}
