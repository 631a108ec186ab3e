/*
 * virtio-mmio transport (version 2): the devices announced on the command line,
 * device initialisation, feature negotiation and queue set-up. The device drivers
 * (virtio_blk.c) sit on top of this and of virtqueue.c.
 */
#include "virtio_mmio.h"

/* Bound on polling Status for the end of a reset. */
#define RESET_TIMEOUT_US 100000
/* Bound on re-reading the configuration while ConfigGeneration changes. */
#define CONFIG_RETRIES 100

/* Ring pages: one per queue set up, kept by the queue across resets. */
#define RING_PAGES (MAX_VIRTIO_SLOTS * VIRTIO_MAX_QUEUES)

static struct virtio_dev devs[MAX_VIRTIO_SLOTS] NOINIT;
static u8 ring_pages[RING_PAGES][VIRTQ_RING_BYTES] NOINIT __attribute__((aligned(4096)));
static u32 nr_devs, nr_ring_pages;

u32 virtio_count(void)
{
	return nr_devs;
}

struct virtio_dev *virtio_get(u32 slot)
{
	return slot < nr_devs ? &devs[slot] : NULL;
}

static void error(const struct virtio_dev *d, const char *what)
{
	tg_printf("virtio: slot=%u error=%s\n", d->slot, what);
}

/*
 * Read the identification registers of every virtio_mmio.device= entry. With
 * tg.virtio=1, print one line per entry. Nothing is written to the devices.
 */
void virtio_probe_all(const struct tg_opts *o)
{
	nr_devs = o->nr_virtio;
	nr_ring_pages = 0;
	if (o->virtio && nr_devs == 0)
		tg_printf("virtio: none\n");

	for (u32 i = 0; i < nr_devs; i++) {
		struct virtio_dev *d = &devs[i];
		const struct virtio_slot *s = &o->virtio_slots[i];

		/* Field by field: memset of the whole structure (queue bookkeeping included)
		 * would be slow where rep stosb runs in an instruction emulator. */
		d->slot = i;
		d->base = s->base;
		d->size = s->size;
		d->irq = s->irq;
		d->usable = 0;
		d->version = d->device_id = d->vendor_id = 0;
		d->wanted = d->offered = d->features = 0;
		d->nr_queues = 0;
		for (u32 q = 0; q < VIRTIO_MAX_QUEUES; q++)
			d->vq[q].ring = NULL;
		if (!phys_ok(d->base, VIRTIO_MMIO_MIN_SIZE)) {
			if (o->virtio)
				tg_printf("virtio: slot=%u base=0x%lx irq=%u error=unmapped\n", i, d->base,
					  d->irq);
			continue;
		}
		if (d->size < VIRTIO_MMIO_MIN_SIZE) {
			if (o->virtio)
				tg_printf("virtio: slot=%u base=0x%lx irq=%u error=too-small size=0x%lx\n",
					  i, d->base, d->irq, d->size);
			continue;
		}
		u32 magic = virtio_read(d, VIRTIO_MMIO_MAGIC_VALUE);
		if (magic != VIRTIO_MMIO_MAGIC) {
			if (o->virtio)
				tg_printf("virtio: slot=%u base=0x%lx irq=%u error=bad-magic magic=0x%x\n",
					  i, d->base, d->irq, magic);
			continue;
		}
		d->usable = 1;
		d->version = virtio_read(d, VIRTIO_MMIO_VERSION);
		d->device_id = virtio_read(d, VIRTIO_MMIO_DEVICE_ID);
		d->vendor_id = virtio_read(d, VIRTIO_MMIO_VENDOR_ID);
		if (o->virtio)
			tg_printf("virtio: slot=%u base=0x%lx irq=%u id=%u version=%u\n", i, d->base,
				  d->irq, d->device_id, d->version);
	}
}

u32 virtio_status(const struct virtio_dev *d)
{
	return virtio_read(d, VIRTIO_MMIO_STATUS);
}

int virtio_needs_reset(const struct virtio_dev *d)
{
	return (virtio_status(d) & VIRTIO_STATUS_NEEDS_RESET) != 0;
}

u32 virtio_ack_interrupt(u64 mmio_base)
{
	u32 isr = mmio_read32(mmio_base + VIRTIO_MMIO_INTERRUPT_STATUS);
	if (isr)
		mmio_write32(mmio_base + VIRTIO_MMIO_INTERRUPT_ACK, isr);
	return isr;
}

static void set_status(struct virtio_dev *d, u32 bits)
{
	virtio_write(d, VIRTIO_MMIO_STATUS, virtio_status(d) | bits);
}

static int fail(struct virtio_dev *d, const char *what)
{
	error(d, what);
	set_status(d, VIRTIO_STATUS_FAILED);
	return -1;
}

/* Write 0 to Status and wait until it reads back 0 (section 4.2.3.1.1). */
int virtio_reset(struct virtio_dev *d)
{
	u64 deadline = tsc_deadline_us(RESET_TIMEOUT_US);

	virtio_write(d, VIRTIO_MMIO_STATUS, 0);
	while (virtio_status(d) != 0) {
		if (tsc_passed(deadline)) {
			error(d, "reset-timeout");
			return -1;
		}
		cpu_relax();
	}
	return 0;
}

int virtio_init(struct virtio_dev *d, u64 wanted)
{
	if (!d->usable)
		return -1;
	if (d->version != 2) {
		tg_printf("virtio: slot=%u error=unsupported-version version=%u\n", d->slot, d->version);
		return -1;
	}
	d->wanted = wanted;
	d->nr_queues = 0;
	if (virtio_reset(d) != 0)
		return -1;
	set_status(d, VIRTIO_STATUS_ACKNOWLEDGE);
	set_status(d, VIRTIO_STATUS_DRIVER);

	virtio_write(d, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
	u64 lo = virtio_read(d, VIRTIO_MMIO_DEVICE_FEATURES);
	virtio_write(d, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
	u64 hi = virtio_read(d, VIRTIO_MMIO_DEVICE_FEATURES);
	d->offered = hi << 32 | lo;
	if (!(d->offered & VIRTIO_F_VERSION_1))
		return fail(d, "no-version-1");

	d->features = d->offered & (wanted | VIRTIO_F_VERSION_1);
	virtio_write(d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
	virtio_write(d, VIRTIO_MMIO_DRIVER_FEATURES, (u32)d->features);
	virtio_write(d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
	virtio_write(d, VIRTIO_MMIO_DRIVER_FEATURES, (u32)(d->features >> 32));
	set_status(d, VIRTIO_STATUS_FEATURES_OK);
	u32 st = virtio_status(d);
	if (st & VIRTIO_STATUS_NEEDS_RESET)
		return fail(d, "device-needs-reset");
	if (!(st & VIRTIO_STATUS_FEATURES_OK))
		return fail(d, "features-rejected");
	return 0;
}

int virtio_setup_queue(struct virtio_dev *d, u16 index, u16 size)
{
	struct virtq *vq;

	if (index >= VIRTIO_MAX_QUEUES || index != d->nr_queues)
		return fail(d, "queue-index");
	vq = &d->vq[index];
	virtio_write(d, VIRTIO_MMIO_QUEUE_SEL, index);
	if (virtio_read(d, VIRTIO_MMIO_QUEUE_READY) != 0)
		return fail(d, "queue-busy");
	u32 max = virtio_read(d, VIRTIO_MMIO_QUEUE_NUM_MAX);
	if (max == 0)
		return fail(d, "queue-unavailable");
	if (size > VIRTQ_MAX_SIZE)
		size = VIRTQ_MAX_SIZE;
	if (size > max)
		size = (u16)max;
	while (size & (size - 1))
		size &= (u16)(size - 1); /* largest power of two not above it */

	/* The ring page stays with the queue, so re-initialisation reuses it. */
	if (!vq->ring) {
		if (nr_ring_pages >= RING_PAGES)
			return fail(d, "out-of-ring-pages");
		vq->ring = ring_pages[nr_ring_pages++];
	}
	virtq_init(vq, vq->ring, d->slot, index, size, d->base);
	d->queue_size[index] = size;

	u64 desc = (u64)vq->desc, avail = (u64)vq->avail, used = (u64)vq->used;
	virtio_write(d, VIRTIO_MMIO_QUEUE_NUM, size);
	virtio_write(d, VIRTIO_MMIO_QUEUE_DESC_LOW, (u32)desc);
	virtio_write(d, VIRTIO_MMIO_QUEUE_DESC_HIGH, (u32)(desc >> 32));
	virtio_write(d, VIRTIO_MMIO_QUEUE_DRIVER_LOW, (u32)avail);
	virtio_write(d, VIRTIO_MMIO_QUEUE_DRIVER_HIGH, (u32)(avail >> 32));
	virtio_write(d, VIRTIO_MMIO_QUEUE_DEVICE_LOW, (u32)used);
	virtio_write(d, VIRTIO_MMIO_QUEUE_DEVICE_HIGH, (u32)(used >> 32));
	virtio_write(d, VIRTIO_MMIO_QUEUE_READY, 1);
	d->nr_queues++;
	return 0;
}

int virtio_driver_ok(struct virtio_dev *d)
{
	set_status(d, VIRTIO_STATUS_DRIVER_OK);
	if (virtio_needs_reset(d))
		return fail(d, "device-needs-reset");
	return 0;
}

int virtio_reinit(struct virtio_dev *d)
{
	u32 n = d->nr_queues;
	u16 sizes[VIRTIO_MAX_QUEUES];

	for (u32 i = 0; i < n; i++)
		sizes[i] = d->queue_size[i];
	if (virtio_init(d, d->wanted) != 0)
		return -1;
	for (u32 i = 0; i < n; i++)
		if (virtio_setup_queue(d, (u16)i, sizes[i]) != 0)
			return -1;
	return virtio_driver_ok(d);
}

/*
 * Section 4.2.2.2: the driver reads the generation before and after the
 * configuration and retries if it changed. Only 32-bit accesses are used.
 */
void virtio_config_read(const struct virtio_dev *d, u32 off, void *buf, u32 len)
{
	u8 *out = buf;

	for (int tries = 0; tries < CONFIG_RETRIES; tries++) {
		u32 gen = virtio_read(d, VIRTIO_MMIO_CONFIG_GENERATION);
		for (u32 pos = off & ~3U; pos < off + len; pos += 4) {
			u32 w = virtio_read(d, VIRTIO_MMIO_CONFIG + pos);
			for (u32 b = 0; b < 4; b++)
				if (pos + b >= off && pos + b < off + len)
					out[pos + b - off] = (u8)(w >> (8 * b));
		}
		barrier();
		if (virtio_read(d, VIRTIO_MMIO_CONFIG_GENERATION) == gen)
			return;
	}
}

u32 virtio_config_read32(const struct virtio_dev *d, u32 off)
{
	u32 v;
	virtio_config_read(d, off, &v, sizeof(v));
	return v;
}

u64 virtio_config_read64(const struct virtio_dev *d, u32 off)
{
	u64 v;
	virtio_config_read(d, off, &v, sizeof(v));
	return v;
}
