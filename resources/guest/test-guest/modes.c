/* The modes both test guests (x86_64 and arm64) run the same way: counting and serial echo. */
#include "tg.h"

/* tg.count lines, tg.delay_ms apart. */
void tg_count(const struct tg_opts *o)
{
	for (u64 i = 1; i <= o->count; i++) {
		if (i > 1 && o->delay_ms)
			delay_ms(o->delay_ms);
		tg_printf("count: %lu\n", i);
	}
}

/* Echo serial input until a 'q' at the start of a line (so "q" and "quit" both end it). */
void tg_echo(void)
{
	int line_start = 1;

	tg_printf("echo: ready\n");
	for (;;) {
		u8 c = serial_getc();
		serial_putc((char)c);
		if (line_start && c == 'q')
			break;
		line_start = c == '\n' || c == '\r';
	}
	tg_printf("\necho: done\n");
}
