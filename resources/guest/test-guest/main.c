/*
 * Test guest main program. Output goes to COM1, one fact per line; see
 * docs/test-guest.md for the exact lines.
 */
#include "tg.h"

/* Not zeroed at start-up (large; bootinfo_parse() sets what is read). */
static struct bootinfo bi NOINIT;
/* opts_parse() sets every field (virtio_slots[] up to nr_virtio). */
static struct tg_opts opts NOINIT;
static struct mp_info mp;

static void __attribute__((noreturn)) halt_forever(void)
{
	for (;;)
		__asm__ volatile("cli; hlt");
}

/* Load an empty IDT and raise an exception: #UD -> #GP -> #DF -> shutdown. */
void __attribute__((noreturn)) triple_fault(void)
{
	static const struct {
		u16 limit;
		u64 base;
	} __attribute__((packed)) empty_idt = { 0, 0 };

	__asm__ volatile("lidt %0" : : "m"(empty_idt));
	__asm__ volatile("ud2");
	halt_forever();
}

static void print_cmdline(void)
{
	if (tg_quiet)
		return;
	tg_printf("cmdline: ");
	for (u32 i = 0; i < bi.cmdline_len; i++) {
		char c = bi.cmdline[i];
		serial_putc(c >= 0x20 && c < 0x7f ? c : '?');
	}
	tg_printf("\n");
}

static u64 usable_bytes(void)
{
	u64 usable = 0;
	for (u32 i = 0; i < bi.nr_mem; i++)
		if (bi.mem[i].type == 1)
			usable += bi.mem[i].size;
	return usable;
}

static void print_memmap(void)
{
	u64 usable = 0;

	if (bi.nr_mem == 0)
		tg_info("e820: none\n");
	for (u32 i = 0; i < bi.nr_mem; i++) {
		const struct mem_entry *e = &bi.mem[i];
		tg_info("e820: 0x%lx-0x%lx type=%u\n", e->addr, e->addr + e->size, e->type);
		if (e->type == 1)
			usable += e->size;
	}
	tg_info("mem: usable=%lu KiB\n", usable / 1024);
}

/*
 * Poll the i8042 for Ctrl, Alt, Delete make codes (scancode set 2: 14, 11, e0 71), as a VMM's
 * SendCtrlAltDel queues them; bounded to 10 s.
 */
static void wait_ctrl_alt_del(void)
{
	static const u8 want[] = { 0x14, 0x11, 0xe0, 0x71 };
	u32 matched = 0;
	u64 deadline = tsc_deadline_us(10 * 1000 * 1000);

	tg_printf("kbd: waiting\n");
	while (matched < sizeof(want)) {
		if (tsc_passed(deadline)) {
			tg_printf("kbd: timeout\n");
			return;
		}
		if (!(inb(0x64) & 0x01)) {
			cpu_relax();
			continue;
		}
		u8 code = inb(0x60);
		matched = code == want[matched] ? matched + 1 : (code == want[0] ? 1 : 0);
	}
	tg_printf("kbd: ctrl-alt-del\n");
}

static void __attribute__((noreturn)) finish(void)
{
	switch (opts.exit_mode) {
	case EXIT_HALT:
		tg_printf("testguest: done\n");
		halt_forever();
	case EXIT_FAULT:
		tg_printf("testguest: fault\n");
		triple_fault();
	case EXIT_REBOOT:
	default:
		tg_printf("testguest: done\n");
		/* i8042 "pulse reset line"; a floating bus (no controller) reads 0xff. */
		if (inb(0x64) != 0xff) {
			for (int i = 0; i < 1000 && (inb(0x64) & 0x02); i++)
				cpu_relax(); /* input buffer full */
			outb(0x64, 0xfe);
			delay_ms(100);
		}
		triple_fault();
	}
}

void tg_main(u32 protocol, u64 info)
{
	/* Boot timer first: only look for tg.timer=0 in place, parse the rest after. */
	u32 len;
	const char *cmdline = bootinfo_early_cmdline(protocol, info, &len);
	if (!opts_timer_disabled(cmdline, len))
		mmio_write8(BOOT_TIMER_ADDR, BOOT_TIMER_VALUE);

	bootinfo_parse(protocol, info, &bi);
	opts_parse(bi.cmdline, bi.cmdline_len, &opts);
	tg_quiet = opts.quiet;

	serial_init();
	tg_info("testguest: start protocol=%s\n", bi.protocol_name);
	if (!bi.valid)
		tg_info("bootinfo: invalid addr=0x%lx\n", info);
	print_cmdline();
	print_memmap();

	mptable_find(&mp);
	mptable_print(&mp);
	smp_boot(&bi, &mp, &opts);

	tg_devices(&opts, usable_bytes());
	tg_count(&opts);
	tg_devices_late(&opts);
	if (opts.echo)
		tg_echo();
	if (opts.kbd)
		wait_ctrl_alt_del();
	finish();
}
