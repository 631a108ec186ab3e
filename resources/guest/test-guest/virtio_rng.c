/*
 * virtio-rng driver (virtio 1.x, section 5.4) and tg.rng=N: asks the entropy device for N
 * bytes (in one device-writable buffer, at most 4096) twice and prints what came back:
 *   rng: <bytes> bytes, <distinct> distinct values, first <hex of 8 bytes>
 *   rng: second request differs
 * or "rng: none" / "rng: error <what>". See docs/test-guest.md.
 */
#include "virtio_mmio.h"

#define RNG_QUEUE_SIZE 8
#define RNG_MAX 4096
#define RNG_TIMEOUT_US 5000000

static u8 rng_buf[2][RNG_MAX] NOINIT __attribute__((aligned(4096)));

static int request(struct virtio_dev *d, u8 *buf, u32 len, u32 *got)
{
	struct virtq_buf b = { (u64)buf, len, VIRTQ_DESC_F_WRITE };
	if (virtq_add(&d->vq[0], &b, 1, 0) < 0)
		return -1;
	virtq_kick(&d->vq[0]);
	return virtq_wait_used(&d->vq[0], RNG_TIMEOUT_US, got, NULL);
}

void virtio_rng_run(const struct tg_opts *o)
{
	u32 len = o->rng > RNG_MAX ? RNG_MAX : (u32)o->rng;
	for (u32 slot = 0; slot < virtio_count(); slot++) {
		struct virtio_dev *d = virtio_get(slot);
		if (!d->usable || d->device_id != VIRTIO_ID_RNG)
			continue;
		if (virtio_init(d, 0) != 0 || virtio_setup_queue(d, 0, RNG_QUEUE_SIZE) != 0 ||
		    virtio_driver_ok(d) != 0) {
			tg_printf("rng: error setup\n");
			return;
		}
		u32 got[2] = { 0, 0 };
		for (int i = 0; i < 2; i++) {
			for (u32 j = 0; j < len; j++)
				rng_buf[i][j] = 0;
			if (request(d, rng_buf[i], len, &got[i]) != VIRTQ_DONE) {
				tg_printf("rng: error request %d\n", i);
				return;
			}
		}
		u8 seen[256] = { 0 };
		u32 distinct = 0;
		for (u32 j = 0; j < got[0]; j++) {
			if (!seen[rng_buf[0][j]]++)
				distinct++;
		}
		tg_printf("rng: %u bytes, %u distinct values, first", got[0], distinct);
		for (u32 j = 0; j < 8 && j < got[0]; j++)
			tg_printf(" %02x", rng_buf[0][j]);
		tg_printf("\n");
		int same = got[0] == got[1];
		for (u32 j = 0; same && j < got[0]; j++)
			same = rng_buf[0][j] == rng_buf[1][j];
		tg_printf("rng: second request %s\n", same ? "is identical" : "differs");
		return;
	}
	tg_printf("rng: none\n");
}
