/* Deadlines, delays and benchmark times from the generic timer's virtual counter (rdtsc()). */
#include "tg.h"

static u64 counter_hz(void)
{
	u64 v;
	__asm__ volatile("mrs %0, cntfrq_el0" : "=r"(v));
	return v ? v : 1;
}

void tsc_report(void)
{
	static int reported;
	if (reported)
		return;
	reported = 1;
	tg_printf("tsc: khz=%lu source=cntfrq\n", counter_hz() / 1000);
}

u64 tsc_deadline_us(u64 us)
{
	u64 hz = counter_hz();
	return rdtsc() + us / 1000000 * hz + us % 1000000 * hz / 1000000;
}

int tsc_passed(u64 deadline)
{
	return (i64)(rdtsc() - deadline) >= 0;
}

u64 tsc_cycles_to_us(u64 cycles)
{
	u64 hz = counter_hz();
	return cycles / hz * 1000000 + cycles % hz * 1000000 / hz;
}

void delay_us(u64 us)
{
	u64 deadline = tsc_deadline_us(us);
	while (!tsc_passed(deadline))
		cpu_relax();
}

void delay_ms(u64 ms)
{
	delay_us(ms * 1000);
}
