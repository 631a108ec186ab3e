/*
 * The modes both test guests (x86_64 and arm64) run the same way: the virtio devices' modes,
 * counting and serial echo.
 */
#include "tg.h"

/* The virtio modes before counting: probing, then tg.blk and tg.net (unless late), tg.rng,
 * tg.vsock, tg.balloon. */
void tg_devices(const struct tg_opts *o, u64 usable)
{
	if (o->virtio || o->blk != BLK_OFF || o->net != NET_OFF || o->rng || o->vsock != VSOCK_OFF ||
	    o->balloon)
		virtio_probe_all(o);
	if (o->blk != BLK_OFF && !o->blk_late)
		virtio_blk_run(o);
	if (o->net != NET_OFF && !o->net_late)
		virtio_net_run(o);
	if (o->rng)
		virtio_rng_run(o);
#ifdef __aarch64__
	/* The vsock and balloon drivers are not part of the arm64 build (the balloon's assumes RAM
	 * from address 0). */
	(void)usable;
	if (o->vsock != VSOCK_OFF)
		tg_printf("vsock: not in the arm64 test guest\n");
	if (o->balloon)
		tg_printf("balloon: not in the arm64 test guest\n");
#else
	if (o->vsock != VSOCK_OFF)
		virtio_vsock_run(o);
	if (o->balloon)
		virtio_balloon_run(o, usable);
#endif
}

/* tg.blk and tg.net after counting, with tg.blk_late / tg.net_late. */
void tg_devices_late(const struct tg_opts *o)
{
	if (o->blk != BLK_OFF && o->blk_late)
		virtio_blk_run(o);
	if (o->net != NET_OFF && o->net_late)
		virtio_net_run(o);
}

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
