/*
 * Split virtqueue: descriptor chains in, used elements out, by polling.
 *
 * Ordering: x86 keeps stores in order and loads in order, so it is enough that the
 * compiler does not move the ring accesses around the index updates (release store of
 * avail->idx, acquire load of used->idx) and that the notify is a volatile MMIO store
 * after them. No fence instructions are needed (and none are used: the event-index
 * feature, whose check needs a store-load fence, is not negotiated).
 */
#include "virtqueue.h"
#include "virtio_mmio.h"

void virtq_init(struct virtq *vq, u8 *ring, u32 slot, u16 index, u16 size, u64 mmio_base)
{
	/* Only the parts a queue of this size uses (cheaper under an instruction emulator). */
	memset(ring + VIRTQ_DESC_OFF, 0, sizeof(struct virtq_desc) * size);
	memset(ring + VIRTQ_AVAIL_OFF, 0, 6 + 2 * (size_t)size);
	memset(ring + VIRTQ_USED_OFF, 0, 6 + sizeof(struct virtq_used_elem) * size);
	vq->slot = slot;
	vq->index = index;
	vq->size = size;
	vq->mmio_base = mmio_base;
	vq->ring = ring;
	vq->desc = (volatile struct virtq_desc *)(ring + VIRTQ_DESC_OFF);
	vq->avail = (volatile struct virtq_avail *)(ring + VIRTQ_AVAIL_OFF);
	vq->used = (volatile struct virtq_used *)(ring + VIRTQ_USED_OFF);
	vq->avail_idx = 0;
	vq->last_used = 0;
	vq->free_head = 0;
	vq->num_free = size;
	for (u16 i = 0; i < size; i++) {
		vq->next[i] = (u16)(i + 1 < size ? i + 1 : 0);
		vq->chain_len[i] = 0;
		vq->token[i] = 0;
		vq->fixed[i] = 0;
		vq->posted[i] = 0;
	}
}

u16 virtq_in_flight(const struct virtq *vq)
{
	return (u16)(vq->size - vq->num_free);
}

/* Take n descriptors off the free list; ids[] gets them in chain order. */
static int alloc_descs(struct virtq *vq, u16 n, u16 *ids)
{
	if (n == 0 || n > vq->num_free)
		return -1;
	u16 id = vq->free_head;
	for (u16 i = 0; i < n; i++) {
		ids[i] = id;
		id = vq->next[id];
	}
	vq->free_head = id;
	vq->num_free = (u16)(vq->num_free - n);
	return 0;
}

static void publish(struct virtq *vq, u16 head)
{
	vq->avail->ring[vq->avail_idx & (vq->size - 1)] = head;
	vq->avail_idx++;
	/* The descriptors and the ring entry are visible before the index. */
	__atomic_store_n(&vq->avail->idx, vq->avail_idx, __ATOMIC_RELEASE);
}

/* Write a chain of n buffers into free descriptors; returns its head, or -1. */
static int write_chain(struct virtq *vq, const struct virtq_buf *bufs, u32 n, u64 token)
{
	u16 ids[VIRTQ_MAX_SIZE];

	if (n > vq->size || alloc_descs(vq, (u16)n, ids) != 0)
		return -1;
	for (u32 i = 0; i < n; i++) {
		volatile struct virtq_desc *d = &vq->desc[ids[i]];
		int more = i + 1 < n;
		d->addr = bufs[i].addr;
		d->len = bufs[i].len;
		d->flags = (u16)((bufs[i].flags & VIRTQ_DESC_F_WRITE) | (more ? VIRTQ_DESC_F_NEXT : 0));
		d->next = more ? ids[i + 1] : 0;
	}
	vq->chain_len[ids[0]] = (u16)n;
	vq->token[ids[0]] = token;
	return ids[0];
}

/*
 * Add a chain of n buffers and make it available (without notifying the device).
 * Device-readable buffers must come before device-writable ones. Returns the head
 * index, or -1 if the queue has fewer than n free descriptors.
 */
int virtq_add(struct virtq *vq, const struct virtq_buf *bufs, u32 n, u64 token)
{
	int head = write_chain(vq, bufs, n, token);

	if (head >= 0)
		publish(vq, (u16)head);
	return head;
}

int virtq_add_fixed(struct virtq *vq, const struct virtq_buf *bufs, u32 n, u64 token)
{
	int head = write_chain(vq, bufs, n, token);

	if (head >= 0) {
		vq->fixed[head] = 1;
		vq->posted[head] = 0;
	}
	return head;
}

void virtq_post(struct virtq *vq, u16 head)
{
	vq->posted[head] = 1;
	publish(vq, head);
}

u16 virtq_desc_of(const struct virtq *vq, u16 head, u32 pos)
{
	while (pos--)
		head = vq->next[head];
	return head;
}

int virtq_add_raw(struct virtq *vq, const struct virtq_desc *src, u16 n, u64 token)
{
	u16 ids[VIRTQ_MAX_SIZE];

	if (n > vq->size || alloc_descs(vq, n, ids) != 0)
		return -1;
	for (u16 i = 0; i < n; i++) {
		volatile struct virtq_desc *d = &vq->desc[ids[i]];
		d->addr = src[i].addr;
		d->len = src[i].len;
		d->flags = src[i].flags;
		d->next = src[i].next < n ? ids[src[i].next] : src[i].next;
	}
	vq->chain_len[ids[0]] = n;
	vq->token[ids[0]] = token;
	publish(vq, ids[0]);
	return ids[0];
}

void virtq_publish_raw(struct virtq *vq, u16 head)
{
	publish(vq, head);
}

void virtq_advance_avail_raw(struct virtq *vq, u16 by)
{
	vq->avail_idx = (u16)(vq->avail_idx + by);
	__atomic_store_n(&vq->avail->idx, vq->avail_idx, __ATOMIC_RELEASE);
}

void virtq_kick(struct virtq *vq)
{
	io_wmb();
	mmio_write32(vq->mmio_base + VIRTIO_MMIO_QUEUE_NOTIFY, vq->index);
}

static void free_chain(struct virtq *vq, u16 head)
{
	u16 n = vq->chain_len[head], tail = head;
	for (u16 i = 1; i < n; i++)
		tail = vq->next[tail];
	vq->next[tail] = vq->free_head;
	vq->free_head = head;
	vq->num_free = (u16)(vq->num_free + n);
	vq->chain_len[head] = 0;
}

/*
 * Take one element off the used ring. VIRTQ_DONE: *len is what the device reports it
 * wrote, *token the value given to virtq_add, and the chain's descriptors are free
 * again (a fixed chain keeps them). VIRTQ_BAD: the device moved used->idx by more
 * than the queue holds or returned an index that was not the head of a chain in
 * flight (or of a posted fixed chain); a
 * "virtq: slot=<i> queue=<q> error=..." line is printed.
 */
int virtq_get_used(struct virtq *vq, u32 *len, u64 *token)
{
	u16 idx = __atomic_load_n(&vq->used->idx, __ATOMIC_ACQUIRE);
	u16 pending = (u16)(idx - vq->last_used);

	if (pending == 0)
		return VIRTQ_NONE;
	if (pending > virtq_in_flight(vq)) {
		tg_printf("virtq: slot=%u queue=%u error=used-idx used_idx=%u last_used=%u in_flight=%u\n",
			  vq->slot, vq->index, idx, vq->last_used, virtq_in_flight(vq));
		vq->last_used = idx; /* do not report the same jump again */
		return VIRTQ_BAD;
	}
	volatile struct virtq_used_elem *e = &vq->used->ring[vq->last_used & (vq->size - 1)];
	u32 id = e->id, l = e->len;
	vq->last_used++;
	if (id >= vq->size || vq->chain_len[id] == 0 || (vq->fixed[id] && !vq->posted[id])) {
		tg_printf("virtq: slot=%u queue=%u error=used-id id=%u\n", vq->slot, vq->index, id);
		return VIRTQ_BAD;
	}
	if (len)
		*len = l;
	if (token)
		*token = vq->token[id];
	if (vq->fixed[id])
		vq->posted[id] = 0;
	else
		free_chain(vq, (u16)id);
	return VIRTQ_DONE;
}

/*
 * Poll for one used element for at most timeout_us, then read and acknowledge the
 * interrupt status so that the device's interrupt line is deasserted.
 */
int virtq_wait_used(struct virtq *vq, u64 timeout_us, u32 *len, u64 *token)
{
	u64 deadline = tsc_deadline_us(timeout_us);
	int r;

	for (;;) {
		r = virtq_get_used(vq, len, token);
		if (r != VIRTQ_NONE)
			break;
		if (tsc_passed(deadline))
			return VIRTQ_TIMEOUT;
		cpu_relax();
	}
	virtio_ack_interrupt(vq->mmio_base);
	return r;
}
