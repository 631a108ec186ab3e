/*
 * virtio-blk driver (virtio 1.x, section 5.2) and the tg.blk modes: check, read,
 * write, bench and hostile. One request is in flight at a time. A request is a chain
 * of a 16-byte header (device-readable), the data descriptors (device-readable for
 * writes, device-writable for reads and GET_ID; none for FLUSH) and a 1-byte status
 * (device-writable). See docs/test-guest.md for the output lines.
 */
#include "virtio_mmio.h"

#define VIRTIO_BLK_F_SIZE_MAX (1UL << 1)
#define VIRTIO_BLK_F_SEG_MAX (1UL << 2)
#define VIRTIO_BLK_F_RO (1UL << 5)
#define VIRTIO_BLK_F_FLUSH (1UL << 9)

/* Configuration layout. */
#define BLK_CFG_CAPACITY 0x00 /* u64, 512-byte sectors */
#define BLK_CFG_SIZE_MAX 0x08 /* u32, bytes per data descriptor */
#define BLK_CFG_SEG_MAX 0x0c  /* u32, data descriptors per request */

#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_T_FLUSH 4
#define VIRTIO_BLK_T_GET_ID 8
#define VIRTIO_BLK_ID_BYTES 20

#define SECTOR 512UL
#define BLK_QUEUE_SIZE 16
#define BUF_BYTES (1UL << 20) /* data buffer: the largest request */
#define BUF_SECTORS (BUF_BYTES / SECTOR)
#define SECTORS_PER_MIB (BUF_BYTES / SECTOR)
#define HOSTILE_WAIT_US 200000
#define STATUS_UNSET 0xff

/* Results of a request besides the device's status byte (0..255). */
#define RQ_TIMEOUT (-1) /* no completion within tg.blk_timeout_ms */
#define RQ_ERROR (-2)   /* the device returned something else, or failed before */

struct blk_hdr {
	u32 type;
	u32 reserved;
	u64 sector;
};

/* One request at a time: its header, status byte and GET_ID buffer. */
static struct {
	struct blk_hdr hdr;
	u8 status;
	u8 id[VIRTIO_BLK_ID_BYTES];
} req NOINIT __attribute__((aligned(64)));

static u8 buf[BUF_BYTES] NOINIT __attribute__((aligned(4096)));

struct blk {
	struct virtio_dev *dev;
	struct virtq *vq;
	u32 index;       /* blk<index>: position among the block devices */
	u64 capacity;    /* sectors */
	int ro;
	int flush;
	u32 max_descs;   /* data descriptors per request */
	u32 desc_bytes;  /* bytes per data descriptor */
	u64 max_sectors; /* sectors per request */
	int broken;      /* a request failed without a status: no more requests */
	u64 timeout_us;
};

/* ---- requests ---- */

static int setup(struct blk *b, struct virtio_dev *d, u32 index, const struct tg_opts *o)
{
	b->dev = d;
	b->vq = &d->vq[0];
	b->index = index;
	b->broken = 0;
	b->timeout_us = o->blk_timeout_ms * 1000;
	if (virtio_init(d, VIRTIO_BLK_F_RO | VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_SEG_MAX |
				   VIRTIO_BLK_F_SIZE_MAX) != 0 ||
	    virtio_setup_queue(d, 0, BLK_QUEUE_SIZE) != 0)
		goto err;

	if (b->vq->size < 3) { /* header, data, status */
		tg_printf("blk%u: error=queue-too-small size=%u\n", index, b->vq->size);
		goto err;
	}
	b->capacity = virtio_config_read64(d, BLK_CFG_CAPACITY);
	b->ro = virtio_has(d, VIRTIO_BLK_F_RO);
	b->flush = virtio_has(d, VIRTIO_BLK_F_FLUSH);
	b->desc_bytes = BUF_BYTES;
	if (virtio_has(d, VIRTIO_BLK_F_SIZE_MAX)) {
		u32 size_max = virtio_config_read32(d, BLK_CFG_SIZE_MAX) & ~(u32)(SECTOR - 1);
		if (size_max < SECTOR)
			size_max = SECTOR;
		if (size_max < b->desc_bytes)
			b->desc_bytes = size_max;
	}
	/* Without VIRTIO_BLK_F_SEG_MAX, one data descriptor (what Firecracker accepts). */
	b->max_descs = 1;
	if (virtio_has(d, VIRTIO_BLK_F_SEG_MAX)) {
		u32 seg_max = virtio_config_read32(d, BLK_CFG_SEG_MAX);
		if (seg_max > 1)
			b->max_descs = seg_max;
	}
	if (b->max_descs > (u32)b->vq->size - 2)
		b->max_descs = (u32)b->vq->size - 2;
	u64 bytes = (u64)b->max_descs * b->desc_bytes;
	b->max_sectors = (bytes < BUF_BYTES ? bytes : BUF_BYTES) / SECTOR;

	if (virtio_driver_ok(d) != 0)
		goto err;
	return 0;
err:
	tg_printf("blk%u: error=init slot=%u\n", index, d->slot);
	return -1;
}

/*
 * One request: header, len bytes at data split over at most max_descs descriptors
 * (none if len is 0), status. Returns the status byte, RQ_TIMEOUT or RQ_ERROR.
 */
static int request(struct blk *b, u32 type, u64 sector, u8 *data, u64 len, int dev_writes)
{
	struct virtq_buf bufs[VIRTQ_MAX_SIZE];
	u32 n = 0;

	if (b->broken)
		return RQ_ERROR;
	req.hdr.type = type;
	req.hdr.reserved = 0;
	req.hdr.sector = sector;
	req.status = STATUS_UNSET;
	bufs[n++] = (struct virtq_buf){ (u64)&req.hdr, sizeof(req.hdr), 0 };
	for (u64 off = 0; off < len; off += b->desc_bytes) {
		u64 l = len - off < b->desc_bytes ? len - off : b->desc_bytes;
		if (n - 1 == b->max_descs)
			return RQ_ERROR; /* callers keep requests within max_sectors */
		bufs[n++] = (struct virtq_buf){ (u64)(data + off), (u32)l,
						dev_writes ? VIRTQ_DESC_F_WRITE : 0 };
	}
	bufs[n++] = (struct virtq_buf){ (u64)&req.status, 1, VIRTQ_DESC_F_WRITE };
	if (virtq_add(b->vq, bufs, n, 0) < 0)
		return RQ_ERROR;
	virtq_kick(b->vq);

	int r = virtq_wait_used(b->vq, b->timeout_us, NULL, NULL);
	if (r != VIRTQ_DONE) {
		b->broken = 1;
		if (virtio_needs_reset(b->dev))
			tg_printf("virtio: slot=%u error=device-needs-reset\n", b->dev->slot);
		return r == VIRTQ_TIMEOUT ? RQ_TIMEOUT : RQ_ERROR;
	}
	return *(volatile u8 *)&req.status;
}

/* Reads or writes nsectors at data, in requests of at most max_sectors. */
static int transfer(struct blk *b, u32 type, u64 sector, u8 *data, u64 nsectors)
{
	while (nsectors) {
		u64 n = nsectors < b->max_sectors ? nsectors : b->max_sectors;
		int rc = request(b, type, sector, data, n * SECTOR, type == VIRTIO_BLK_T_IN);
		if (rc != 0)
			return rc;
		sector += n;
		data += n * SECTOR;
		nsectors -= n;
	}
	return 0;
}

/* "blk<i>: <what> status=<n>", "... timeout" or "... error". */
static void print_failure(const struct blk *b, const char *what, int rc)
{
	if (rc == RQ_TIMEOUT)
		tg_printf("blk%u: %s timeout\n", b->index, what);
	else if (rc == RQ_ERROR)
		tg_printf("blk%u: %s error\n", b->index, what);
	else
		tg_printf("blk%u: %s status=%d\n", b->index, what, rc);
}

/* ---- data pattern and checksum ---- */

/* splitmix64's finaliser. */
static u64 mix64(u64 z)
{
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9UL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebUL;
	return z ^ (z >> 31);
}

/* Little-endian 64-bit word j (0..63) of sector s. */
static u64 pattern_word(u64 seed, u64 s, u64 j)
{
	return mix64(seed * 0x9e3779b97f4a7c15UL + s * 64 + j);
}

static void pattern_fill(u8 *p, u64 sector, u64 nsectors, u64 seed)
{
	u64 *w = (u64 *)p;
	for (u64 s = 0; s < nsectors; s++)
		for (u64 j = 0; j < SECTOR / 8; j++)
			*w++ = pattern_word(seed, sector + s, j);
}

/* Index of the first sector that differs from the pattern, or nsectors. */
static u64 pattern_check(const u8 *p, u64 sector, u64 nsectors, u64 seed)
{
	const u64 *w = (const u64 *)p;
	for (u64 s = 0; s < nsectors; s++)
		for (u64 j = 0; j < SECTOR / 8; j++)
			if (*w++ != pattern_word(seed, sector + s, j))
				return s;
	return nsectors;
}

/* CRC-32 (IEEE 802.3, reflected; what zlib.crc32 computes). */
static u32 crc_table[256] NOINIT;
static int crc_table_ready;

static u32 crc32_update(u32 crc, const u8 *p, u64 n)
{
	if (!crc_table_ready) {
		for (u32 i = 0; i < 256; i++) {
			u32 c = i;
			for (int k = 0; k < 8; k++)
				c = c & 1 ? 0xedb88320U ^ (c >> 1) : c >> 1;
			crc_table[i] = c;
		}
		crc_table_ready = 1;
	}
	crc = ~crc;
	while (n--)
		crc = crc_table[(crc ^ *p++) & 0xff] ^ (crc >> 8);
	return ~crc;
}

/* ---- check, read, write ---- */

/* [sector, sector + count) lies within the capacity; else prints why not. */
static int range_ok(const struct blk *b, u64 sector, u64 count)
{
	if (count && sector < b->capacity && count <= b->capacity - sector)
		return 1;
	tg_printf("blk%u: error=range sector=%lu count=%lu capacity=%lu\n", b->index, sector, count,
		  b->capacity);
	return 0;
}

static void print_identity(struct blk *b)
{
	memset(req.id, 0, sizeof(req.id));
	int rc = request(b, VIRTIO_BLK_T_GET_ID, 0, req.id, VIRTIO_BLK_ID_BYTES, 1);
	if (rc != 0) {
		print_failure(b, "get-id", rc);
		memset(req.id, 0, sizeof(req.id));
	}
	tg_printf("blk%u: capacity=%lu ro=%d flush=%d serial=", b->index, b->capacity, b->ro,
		  b->flush);
	for (u32 i = 0; i < VIRTIO_BLK_ID_BYTES && req.id[i]; i++) {
		char c = (char)req.id[i];
		serial_putc(c > 0x20 && c < 0x7f ? c : '?');
	}
	tg_printf("\n");
}

static int write_pattern(struct blk *b, u64 sector, u64 count, u64 seed)
{
	for (u64 done = 0; done < count;) {
		u64 n = count - done < BUF_SECTORS ? count - done : BUF_SECTORS;
		pattern_fill(buf, sector + done, n, seed);
		int rc = transfer(b, VIRTIO_BLK_T_OUT, sector + done, buf, n);
		if (rc != 0)
			return rc;
		done += n;
	}
	return 0;
}

/* Writes the pattern and flushes: "write ok ..." and "flush ok" (or what failed). */
static int write_and_flush(struct blk *b, u64 sector, u64 count, u64 seed)
{
	int rc = write_pattern(b, sector, count, seed);
	if (rc != 0) {
		print_failure(b, "write", rc);
		return -1;
	}
	tg_printf("blk%u: write ok sectors=%lu-%lu\n", b->index, sector, sector + count - 1);
	if (!b->flush) {
		tg_printf("blk%u: flush skipped\n", b->index);
		return 0;
	}
	rc = request(b, VIRTIO_BLK_T_FLUSH, 0, NULL, 0, 0);
	if (rc != 0) {
		print_failure(b, "flush", rc);
		return -1;
	}
	tg_printf("blk%u: flush ok\n", b->index);
	return 0;
}

/* On a read-only device a write must fail: "ro write status=<n>". */
static int write_ro(struct blk *b, u64 sector, u64 count, u64 seed)
{
	u64 n = count < BUF_SECTORS ? count : BUF_SECTORS;
	pattern_fill(buf, sector, n, seed);
	int rc = transfer(b, VIRTIO_BLK_T_OUT, sector, buf, n);
	print_failure(b, "ro write", rc);
	return rc < 0 ? -1 : 0;
}

static void mode_check(struct blk *b, const struct tg_opts *o)
{
	u64 sector = o->blk_sector, count = o->blk_count, seed = o->blk_seed;

	print_identity(b);
	if (b->broken || !range_ok(b, sector, count))
		return;
	if (b->ro) {
		if (write_ro(b, sector, count, seed) != 0)
			return;
		for (u64 done = 0; done < count;) {
			u64 n = count - done < BUF_SECTORS ? count - done : BUF_SECTORS;
			int rc = transfer(b, VIRTIO_BLK_T_IN, sector + done, buf, n);
			if (rc != 0) {
				print_failure(b, "read", rc);
				return;
			}
			done += n;
		}
		tg_printf("blk%u: read ok\n", b->index);
		return;
	}

	if (write_and_flush(b, sector, count, seed) != 0)
		return;
	for (u64 done = 0; done < count;) {
		u64 n = count - done < BUF_SECTORS ? count - done : BUF_SECTORS;
		memset(buf, 0, n * SECTOR);
		int rc = transfer(b, VIRTIO_BLK_T_IN, sector + done, buf, n);
		if (rc != 0) {
			print_failure(b, "readback", rc);
			return;
		}
		u64 bad = pattern_check(buf, sector + done, n, seed);
		if (bad < n) {
			tg_printf("blk%u: readback mismatch at sector %lu\n", b->index, sector + done + bad);
			return;
		}
		done += n;
	}
	tg_printf("blk%u: readback ok\n", b->index);
}

static void mode_read(struct blk *b, const struct tg_opts *o)
{
	u64 sector = o->blk_sector, count = o->blk_count;
	u32 crc = 0;

	if (!range_ok(b, sector, count))
		return;
	for (u64 done = 0; done < count;) {
		u64 n = count - done < BUF_SECTORS ? count - done : BUF_SECTORS;
		int rc = transfer(b, VIRTIO_BLK_T_IN, sector + done, buf, n);
		if (rc != 0) {
			print_failure(b, "read", rc);
			return;
		}
		crc = crc32_update(crc, buf, n * SECTOR);
		done += n;
	}
	tg_printf("blk%u: read sectors=%lu-%lu crc=0x%x\n", b->index, sector, sector + count - 1, crc);
}

static void mode_write(struct blk *b, const struct tg_opts *o)
{
	if (!range_ok(b, o->blk_sector, o->blk_count))
		return;
	if (b->ro)
		write_ro(b, o->blk_sector, o->blk_count, o->blk_seed);
	else
		write_and_flush(b, o->blk_sector, o->blk_count, o->blk_seed);
}

/* ---- bench ---- */

static u64 xorshift64(u64 *s)
{
	u64 x = *s;
	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	return *s = x;
}

static void bench_failure(const char *what, int rc)
{
	if (rc == RQ_TIMEOUT)
		tg_printf("blkbench: %s timeout\n", what);
	else if (rc == RQ_ERROR)
		tg_printf("blkbench: %s error\n", what);
	else
		tg_printf("blkbench: %s status=%d\n", what, rc);
}

/* MiB-sized sequential requests over [start, start + mib MiB); returns the time in us. */
static int bench_seq(struct blk *b, u32 type, u64 start, u64 mib, u64 *us)
{
	u64 t0 = rdtsc();
	for (u64 m = 0; m < mib; m++) {
		int rc = transfer(b, type, start + m * SECTORS_PER_MIB, buf, SECTORS_PER_MIB);
		if (rc != 0)
			return rc;
	}
	*us = tsc_cycles_to_us(rdtsc() - t0);
	return 0;
}

static void mode_bench(struct blk *b, const struct tg_opts *o)
{
	u64 ops = o->blk_ops, slots = b->capacity / 8, rng = o->blk_seed | 1, us;
	u64 start = o->blk_sector, mib = 0;
	int rc;

	tsc_report();
	if (start < b->capacity)
		mib = (b->capacity - start) / SECTORS_PER_MIB;
	if (mib > o->blk_mib)
		mib = o->blk_mib;
	tg_printf("blkbench: dev=blk%u capacity=%lu ro=%d max_request=%lu max_data_descs=%u queue_size=%u\n",
		  b->index, b->capacity, b->ro, b->max_sectors * SECTOR, b->max_descs, b->vq->size);

	if (slots == 0)
		ops = 0;
	u64 t0 = rdtsc();
	for (u64 i = 0; i < ops; i++) {
		u64 sector = xorshift64(&rng) % slots * 8;
		rc = request(b, VIRTIO_BLK_T_IN, sector, buf, 4096, 1);
		if (rc != 0) {
			bench_failure("randread4k", rc);
			return;
		}
	}
	tg_printf("blkbench: randread4k ops=%lu us=%lu\n", ops, tsc_cycles_to_us(rdtsc() - t0));

	rc = bench_seq(b, VIRTIO_BLK_T_IN, start, mib, &us);
	if (rc != 0) {
		bench_failure("seqread", rc);
		return;
	}
	tg_printf("blkbench: seqread mib=%lu us=%lu\n", mib, us);

	if (b->ro) {
		tg_printf("blkbench: seqwrite skipped ro=1\n");
		return;
	}
	rc = bench_seq(b, VIRTIO_BLK_T_OUT, start, mib, &us);
	if (rc != 0) {
		bench_failure("seqwrite", rc);
		return;
	}
	tg_printf("blkbench: seqwrite mib=%lu us=%lu\n", mib, us);
}

/* ---- hostile ---- */

enum hostile_kind { H_CHAIN, H_HEAD, H_AVAIL };

struct hostile_case {
	const char *name;
	enum hostile_kind kind;
	u32 type;          /* header type */
	int beyond;        /* sector = capacity instead of tg.blk_sector */
	u16 n;             /* descriptors (H_CHAIN) */
	struct virtq_desc d[3];
	int status_in_data; /* status byte = last byte of the data buffer */
};

#define HDR ((u64)&req.hdr)
#define STA ((u64)&req.status)
#define DAT ((u64)buf)
#define R 0
#define W VIRTQ_DESC_F_WRITE
#define N VIRTQ_DESC_F_NEXT

/*
 * The malformed requests, one at a time. All are reads (type IN) of one sector unless
 * noted; d[].next below n is an index into d[] (virtq_add_raw).
 */
static const struct hostile_case hostile_cases[] = {
	{ "oob-addr", H_CHAIN, VIRTIO_BLK_T_IN, 0, 3,
	  { { HDR, 16, R | N, 1 }, { 0xf00000000000UL, 512, W | N, 2 }, { STA, 1, W, 0 } }, 0 },
	{ "no-status", H_CHAIN, VIRTIO_BLK_T_IN, 0, 2,
	  { { HDR, 16, R | N, 1 }, { DAT, 512, W, 0 } }, 1 },
	{ "short-header", H_CHAIN, VIRTIO_BLK_T_IN, 0, 3,
	  { { HDR, 8, R | N, 1 }, { DAT, 512, W | N, 2 }, { STA, 1, W, 0 } }, 0 },
	{ "bad-type", H_CHAIN, 0x99, 0, 3,
	  { { HDR, 16, R | N, 1 }, { DAT, 512, W | N, 2 }, { STA, 1, W, 0 } }, 0 },
	{ "wrong-direction", H_CHAIN, VIRTIO_BLK_T_IN, 0, 3,
	  { { HDR, 16, R | N, 1 }, { DAT, 512, R | N, 2 }, { STA, 1, W, 0 } }, 0 },
	{ "loop", H_CHAIN, VIRTIO_BLK_T_IN, 0, 3, /* status links back to data */
	  { { HDR, 16, R | N, 1 }, { DAT, 512, W | N, 2 }, { STA, 1, W | N, 1 } }, 0 },
	{ "beyond-capacity", H_CHAIN, VIRTIO_BLK_T_IN, 1, 3,
	  { { HDR, 16, R | N, 1 }, { DAT, 512, W | N, 2 }, { STA, 1, W, 0 } }, 0 },
	{ "huge-len", H_CHAIN, VIRTIO_BLK_T_IN, 0, 3,
	  { { HDR, 16, R | N, 1 }, { DAT, 0xfffff000U, W | N, 2 }, { STA, 1, W, 0 } }, 0 },
	{ "bad-next", H_CHAIN, VIRTIO_BLK_T_IN, 0, 1,
	  { { HDR, 16, R | N, 0x7fff } }, 0 },
	{ "bad-head", H_HEAD, VIRTIO_BLK_T_IN, 0, 0, { { 0 } }, 0 },
	{ "avail-overrun", H_AVAIL, VIRTIO_BLK_T_IN, 0, 0, { { 0 } }, 0 },
};

#undef HDR
#undef STA
#undef DAT
#undef R
#undef W
#undef N

/* Reset and set the device up again after a case it did not complete cleanly. */
static int hostile_recover(struct blk *b)
{
	if (virtio_reinit(b->dev) != 0) {
		tg_printf("hostile: reinit failed\n");
		return -1;
	}
	b->broken = 0;
	return 0;
}

static int hostile_one(struct blk *b, const struct hostile_case *c, u64 sector)
{
	struct virtq *vq = b->vq;
	volatile u8 *status = c->status_in_data ? &buf[511] : &req.status;
	int r = VIRTQ_NONE, needs_reset = 0, inconsistent = 0;

	req.hdr.type = c->type;
	req.hdr.reserved = 0;
	req.hdr.sector = c->beyond ? b->capacity : sector;
	req.status = STATUS_UNSET;
	memset(buf, STATUS_UNSET, SECTOR);

	switch (c->kind) {
	case H_CHAIN:
		if (virtq_add_raw(vq, c->d, c->n, 0) < 0) {
			tg_printf("hostile: %s queue-full\n", c->name);
			return -1;
		}
		break;
	case H_HEAD: /* a head index beyond the descriptor table */
		virtq_publish_raw(vq, 0x7fff);
		inconsistent = 1;
		break;
	case H_AVAIL: /* avail->idx moved by more than the queue size */
		virtq_advance_avail_raw(vq, (u16)(vq->size + 1));
		inconsistent = 1;
		break;
	}
	virtq_kick(vq);

	u64 deadline = tsc_deadline_us(HOSTILE_WAIT_US);
	for (u32 i = 1;; i++) {
		r = virtq_get_used(vq, NULL, NULL);
		if (r != VIRTQ_NONE || tsc_passed(deadline))
			break;
		if (i % 64 == 0 && virtio_needs_reset(b->dev))
			break;
		cpu_relax();
	}
	virtio_ack_interrupt(b->dev->base);
	needs_reset = virtio_needs_reset(b->dev);

	if (needs_reset)
		tg_printf("hostile: %s device-needs-reset\n", c->name);
	else if (r == VIRTQ_DONE)
		tg_printf("hostile: %s status=%u\n", c->name, *status);
	else if (r == VIRTQ_BAD)
		tg_printf("hostile: %s bad-completion\n", c->name);
	else
		tg_printf("hostile: %s no-completion\n", c->name);
	if (needs_reset || r != VIRTQ_DONE || inconsistent)
		return hostile_recover(b);
	return 0;
}

static void mode_hostile(struct blk *b, const struct tg_opts *o)
{
	u64 sector = o->blk_sector < b->capacity ? o->blk_sector : 0;

	for (u32 i = 0; i < ARRAY_SIZE(hostile_cases); i++)
		if (hostile_one(b, &hostile_cases[i], sector) != 0)
			return;
	int rc = request(b, VIRTIO_BLK_T_IN, sector, buf, SECTOR, 1);
	if (rc == RQ_TIMEOUT)
		tg_printf("hostile: valid-read no-completion\n");
	else if (rc == RQ_ERROR)
		tg_printf("hostile: valid-read bad-completion\n");
	else
		tg_printf("hostile: valid-read status=%d\n", rc);
}

/* ---- entry ---- */

void virtio_blk_run(const struct tg_opts *o)
{
	struct blk b;
	u32 index = 0, found = 0;

	for (u32 slot = 0; slot < virtio_count(); slot++) {
		struct virtio_dev *d = virtio_get(slot);
		if (!d->usable || d->device_id != VIRTIO_ID_BLOCK)
			continue;
		u32 i = index++;
		int single = o->blk == BLK_BENCH || o->blk == BLK_HOSTILE;
		if (single && i != o->blk_dev)
			continue;
		found = 1;
		if (setup(&b, d, i, o) != 0)
			continue;
		switch (o->blk) {
		case BLK_CHECK:
			mode_check(&b, o);
			break;
		case BLK_READ:
			mode_read(&b, o);
			break;
		case BLK_WRITE:
			mode_write(&b, o);
			break;
		case BLK_BENCH:
			mode_bench(&b, o);
			break;
		case BLK_HOSTILE:
			mode_hostile(&b, o);
			break;
		case BLK_OFF:
			break;
		}
	}
	if (!found) {
		if (index == 0)
			tg_printf("blk: none\n");
		else
			tg_printf("blk: no device blk%lu\n", o->blk_dev);
	}
}
