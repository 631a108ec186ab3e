/*
 * virtio-balloon driver (virtio 1.x, section 5.5) and tg.balloon=N: touches N MiB of RAM
 * (one write per 4 KiB page, filling it with a pattern word), then follows the device's
 * target (num_pages, polled every 10 ms): inflates with those pages, and when the target goes
 * back to 0, deflates. Lines:
 *   balloon: features stats=<0|1> deflate_on_oom=<0|1>
 *   balloon: touched <N> MiB at 0x<addr>
 *   balloon: inflated <pages> pages actual=<pages>
 *   balloon: released pages read as zero: <yes|no>
 *   balloon: deflated <pages> pages actual=<pages>
 *   balloon: stats sent <count>
 * or "balloon: none" / "balloon: error <what>" / "balloon: timeout <what>".
 * With the stats feature, the driver posts a statistics buffer at start and refills it each
 * time the device returns it: total_memory (tag 5) is the usable RAM of the memory map,
 * free_memory (tag 4) that minus the pages in the balloon, minor_faults (tag 3) the number
 * of buffers sent so far.
 * tg.balloon_hostile=1 first sends malformed requests (PFNs outside RAM, a huge array, a
 * device-writable array, a descriptor that links to itself) and prints
 *   balloon: hostile <case> done    or    balloon: hostile <case> no-completion
 * tg.balloon_timeout_ms bounds each wait for a target (default 60000).
 */
#include "virtio_mmio.h"

#define BALLOON_QUEUE_SIZE 64
#define PFNS_PER_REQUEST 256
#define REQUEST_TIMEOUT_US 5000000
#define POLL_MS 10
#define F_STATS_VQ (1UL << 1)
#define F_DEFLATE_ON_OOM (1UL << 2)
#define Q_INFLATE 0
#define Q_DEFLATE 1
#define Q_STATS 2
#define PATTERN 0x62616c6c6f6f6e21UL /* "!noollab" */
/* Where the touched pages start: above the image, 2 MiB aligned, at least 16 MiB. */
#define TOUCH_FLOOR (16UL << 20)

extern const u8 __image_end[];

static u32 pfns[PFNS_PER_REQUEST] __attribute__((aligned(64)));

struct stat_entry {
	u16 tag;
	u64 val;
} __attribute__((packed));

static struct stat_entry stats[3] __attribute__((aligned(64)));

struct balloon {
	struct virtio_dev *d;
	int stats_on;
	u64 usable;
	u64 base;       /* first touched page */
	u64 pages;      /* touched pages */
	u32 actual;     /* pages in the balloon */
	u64 stats_sent;
};

static u32 target(struct balloon *b)
{
	return virtio_config_read32(b->d, 0);
}

static void set_actual(struct balloon *b, u32 pages)
{
	b->actual = pages;
	virtio_write(b->d, VIRTIO_MMIO_CONFIG + 4, pages);
}

static int post_stats(struct balloon *b)
{
	u64 in_balloon = (u64)b->actual * 4096;
	stats[0].tag = 5;
	stats[0].val = b->usable;
	stats[1].tag = 4;
	stats[1].val = b->usable > in_balloon ? b->usable - in_balloon : 0;
	stats[2].tag = 3;
	stats[2].val = ++b->stats_sent;
	struct virtq_buf buf = { (u64)stats, sizeof(stats), 0 };
	if (virtq_add(&b->d->vq[Q_STATS], &buf, 1, 0) < 0)
		return -1;
	virtq_kick(&b->d->vq[Q_STATS]);
	return 0;
}

/* The device returned the stats buffer: send fresh numbers. */
static void serve_stats(struct balloon *b)
{
	if (!b->stats_on)
		return;
	u32 len;
	if (virtq_get_used(&b->d->vq[Q_STATS], &len, NULL) == VIRTQ_DONE)
		post_stats(b);
}

/* Wait until want(target) holds; 0 on success. */
static int wait_target(struct balloon *b, int inflate, u32 pages, u64 timeout_ms)
{
	u64 deadline = tsc_deadline_us(timeout_ms * 1000);
	for (;;) {
		u32 t = target(b);
		if (inflate ? t >= pages : t == 0)
			return 0;
		serve_stats(b);
		if (tsc_passed(deadline))
			return -1;
		delay_ms(POLL_MS);
	}
}

/* One request of n PFNs on queue q; 0 when the device completed it. */
static int send_pfns(struct balloon *b, u16 q, u32 n)
{
	struct virtq_buf buf = { (u64)pfns, n * 4, 0 };
	u32 len;
	if (virtq_add(&b->d->vq[q], &buf, 1, 0) < 0)
		return -1;
	virtq_kick(&b->d->vq[q]);
	return virtq_wait_used(&b->d->vq[q], REQUEST_TIMEOUT_US, &len, NULL) == VIRTQ_DONE ? 0 : -1;
}

/* Give (q = inflate) or take back (q = deflate) every touched page. */
static int move_pages(struct balloon *b, u16 q)
{
	u64 done = 0;
	while (done < b->pages) {
		u32 n = 0;
		while (n < PFNS_PER_REQUEST && done + n < b->pages) {
			pfns[n] = (u32)((b->base >> 12) + done + n);
			n++;
		}
		if (send_pfns(b, q, n) != 0)
			return -1;
		done += n;
		set_actual(b, q == Q_INFLATE ? (u32)done : (u32)(b->pages - done));
		serve_stats(b);
	}
	return 0;
}

static void hostile_case(struct balloon *b, const char *name, const struct virtq_desc *d, u16 n)
{
	struct virtq *vq = &b->d->vq[Q_INFLATE];
	u32 len;
	if (virtq_add_raw(vq, d, n, 0) < 0) {
		tg_printf("balloon: hostile %s queue-full\n", name);
		return;
	}
	virtq_kick(vq);
	int r = virtq_wait_used(vq, REQUEST_TIMEOUT_US, &len, NULL);
	tg_printf("balloon: hostile %s %s\n", name, r == VIRTQ_DONE ? "done" : "no-completion");
}

static void hostile(struct balloon *b)
{
	/* PFNs beyond RAM, in the MMIO hole, and the largest one. */
	pfns[0] = (u32)((b->usable + (64UL << 20)) >> 12);
	pfns[1] = 0xc0000;
	pfns[2] = 0xffffffff;
	struct virtq_desc bad_pfns = { (u64)pfns, 12, 0, 0 };
	hostile_case(b, "pfns-outside-ram", &bad_pfns, 1);
	struct virtq_desc huge = { (u64)pfns, 0xfffff000, 0, 0 };
	hostile_case(b, "huge-array", &huge, 1);
	struct virtq_desc writable = { (u64)pfns, 12, VIRTQ_DESC_F_WRITE, 0 };
	hostile_case(b, "writable-array", &writable, 1);
	struct virtq_desc outside = { 0xfff00000000UL, 16, 0, 0 };
	hostile_case(b, "array-outside-memory", &outside, 1);
	/* One descriptor whose next is itself (the PFNs are outside RAM, so nothing is freed). */
	struct virtq_desc loop = { (u64)pfns, 12, VIRTQ_DESC_F_NEXT, 0 };
	hostile_case(b, "loop", &loop, 1);
}

static int touch(struct balloon *b, u64 mib)
{
	u64 base = (u64)__image_end > TOUCH_FLOOR ? (u64)__image_end : TOUCH_FLOOR;
	base = (base + (2UL << 20) - 1) & ~((2UL << 20) - 1);
	u64 len = mib << 20;
	if (!phys_ok(base, len) || base + len > b->usable)
		return -1;
	b->base = base;
	b->pages = len >> 12;
	for (u64 p = 0; p < b->pages; p++)
		*(volatile u64 *)(base + (p << 12)) = PATTERN + p;
	return 0;
}

/* 1 if the first word of every touched page reads as zero. */
static int pages_zero(struct balloon *b)
{
	for (u64 p = 0; p < b->pages; p++)
		if (*(volatile u64 *)(b->base + (p << 12)) != 0)
			return 0;
	return 1;
}

void virtio_balloon_run(const struct tg_opts *o, u64 usable)
{
	for (u32 slot = 0; slot < virtio_count(); slot++) {
		struct virtio_dev *d = virtio_get(slot);
		if (!d->usable || d->device_id != VIRTIO_ID_BALLOON)
			continue;
		struct balloon b = { d, 0, usable, 0, 0, 0, 0 };
		if (virtio_init(d, F_STATS_VQ | F_DEFLATE_ON_OOM) != 0 ||
		    virtio_setup_queue(d, Q_INFLATE, BALLOON_QUEUE_SIZE) != 0 ||
		    virtio_setup_queue(d, Q_DEFLATE, BALLOON_QUEUE_SIZE) != 0) {
			tg_printf("balloon: error setup\n");
			return;
		}
		b.stats_on = virtio_has(d, F_STATS_VQ);
		if (b.stats_on && virtio_setup_queue(d, Q_STATS, BALLOON_QUEUE_SIZE) != 0) {
			tg_printf("balloon: error setup\n");
			return;
		}
		if (virtio_driver_ok(d) != 0) {
			tg_printf("balloon: error driver-ok\n");
			return;
		}
		tg_printf("balloon: features stats=%d deflate_on_oom=%d\n", b.stats_on,
			  virtio_has(d, F_DEFLATE_ON_OOM) ? 1 : 0);
		if (b.stats_on && post_stats(&b) != 0) {
			tg_printf("balloon: error stats\n");
			return;
		}
		if (o->balloon_hostile)
			hostile(&b);
		if (touch(&b, o->balloon) != 0) {
			tg_printf("balloon: error no room for %lu MiB\n", o->balloon);
			return;
		}
		tg_printf("balloon: touched %lu MiB at 0x%lx\n", o->balloon, b.base);
		if (wait_target(&b, 1, (u32)b.pages, o->balloon_timeout_ms) != 0) {
			tg_printf("balloon: timeout waiting for target %lu\n", b.pages);
			return;
		}
		if (move_pages(&b, Q_INFLATE) != 0) {
			tg_printf("balloon: error inflate\n");
			return;
		}
		tg_printf("balloon: inflated %lu pages actual=%u\n", b.pages, b.actual);
		tg_printf("balloon: released pages read as zero: %s\n", pages_zero(&b) ? "yes" : "no");
		if (wait_target(&b, 0, 0, o->balloon_timeout_ms) != 0) {
			tg_printf("balloon: timeout waiting for target 0\n");
			return;
		}
		if (move_pages(&b, Q_DEFLATE) != 0) {
			tg_printf("balloon: error deflate\n");
			return;
		}
		/* The pages are the guest's again. */
		touch(&b, o->balloon);
		tg_printf("balloon: deflated %lu pages actual=%u\n", b.pages, b.actual);
		tg_printf("balloon: stats sent %lu\n", b.stats_sent);
		return;
	}
	tg_printf("balloon: none\n");
}
