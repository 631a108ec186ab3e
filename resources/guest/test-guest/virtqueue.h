/*
 * Split virtqueues (virtio 1.x, section 2.7) for the virtio-mmio drivers. The ring of
 * one queue lives in one 4 KiB page of guest RAM owned by the driver:
 *
 *   0x000  descriptor table  (16 bytes x size)
 *   0x400  available ring    (flags, idx, ring[size], used_event)
 *   0x800  used ring         (flags, idx, ring[size] of {id, len}, avail_event)
 *
 * so a queue holds at most VIRTQ_MAX_SIZE entries. Completions are polled; there is no
 * interrupt handler (the guest has no IDT).
 */
#ifndef TG_VIRTQUEUE_H
#define TG_VIRTQUEUE_H

#include "tg.h"

#define VIRTQ_DESC_F_NEXT 1
#define VIRTQ_DESC_F_WRITE 2 /* device-writable (else device-readable) */

#define VIRTQ_MAX_SIZE 64
#define VIRTQ_RING_BYTES 4096
#define VIRTQ_DESC_OFF 0x000
#define VIRTQ_AVAIL_OFF 0x400
#define VIRTQ_USED_OFF 0x800

struct virtq_desc {
	u64 addr;
	u32 len;
	u16 flags;
	u16 next;
};

struct virtq_avail {
	u16 flags;
	u16 idx;
	u16 ring[VIRTQ_MAX_SIZE];
};

struct virtq_used_elem {
	u32 id;
	u32 len;
};

struct virtq_used {
	u16 flags;
	u16 idx;
	struct virtq_used_elem ring[VIRTQ_MAX_SIZE];
};

/* One buffer of a descriptor chain. */
struct virtq_buf {
	u64 addr;
	u32 len;
	u16 flags; /* VIRTQ_DESC_F_WRITE for device-writable buffers; NEXT is set by virtq_add */
};

struct virtq {
	u32 slot;      /* device slot, for messages */
	u16 index;     /* queue index on the device */
	u16 size;      /* entries, a power of two <= VIRTQ_MAX_SIZE */
	u16 num_free;
	u16 free_head;
	u16 avail_idx; /* our copy of avail->idx */
	u16 last_used; /* used->idx already consumed */
	u64 mmio_base; /* device registers (notify, interrupt status) */
	volatile struct virtq_desc *desc;
	volatile struct virtq_avail *avail;
	volatile struct virtq_used *used;
	u8 *ring;      /* the ring page */
	/*
	 * Chain bookkeeping kept on the driver side, so that a device writing where it
	 * must not (the descriptor table) cannot corrupt the free list.
	 */
	u16 next[VIRTQ_MAX_SIZE];      /* free list, and the order of each chain */
	u16 chain_len[VIRTQ_MAX_SIZE]; /* descriptors of the chain at this head; 0 = not in flight */
	u64 token[VIRTQ_MAX_SIZE];     /* caller's value for the chain at this head */
	u8 fixed[VIRTQ_MAX_SIZE];      /* the chain at this head keeps its descriptors */
	u8 posted[VIRTQ_MAX_SIZE];     /* fixed chain: available to the device now */
};

/* Results of virtq_get_used() and virtq_wait_used(). */
#define VIRTQ_NONE 0      /* nothing new in the used ring */
#define VIRTQ_DONE 1      /* one chain came back */
#define VIRTQ_TIMEOUT (-1)
#define VIRTQ_BAD (-2)    /* the device returned something that was not in flight */

void virtq_init(struct virtq *vq, u8 *ring, u32 slot, u16 index, u16 size, u64 mmio_base);
int virtq_add(struct virtq *vq, const struct virtq_buf *bufs, u32 n, u64 token);
void virtq_kick(struct virtq *vq);
int virtq_get_used(struct virtq *vq, u32 *len, u64 *token);
int virtq_wait_used(struct virtq *vq, u64 timeout_us, u32 *len, u64 *token);
u16 virtq_in_flight(const struct virtq *vq);

/*
 * Fixed chains, for buffers that always use the same descriptors (virtio-net's receive
 * buffers and transmit slots): virtq_add_fixed() writes the chain once without making
 * it available; virtq_post() makes it available (again), without rewriting the
 * descriptors; virtq_get_used() returns it with its descriptors still reserved, and a
 * used element naming a fixed chain that is not posted is an error. virtq_desc_of()
 * gives the descriptor at position pos of a chain (to change its length before a post).
 * virtq_in_flight() counts the descriptors of fixed chains whether posted or not.
 */
int virtq_add_fixed(struct virtq *vq, const struct virtq_buf *bufs, u32 n, u64 token);
void virtq_post(struct virtq *vq, u16 head);
u16 virtq_desc_of(const struct virtq *vq, u16 head, u32 pos);

/*
 * For malformed-request tests. virtq_add_raw() copies n descriptors as given, except
 * that a NEXT link below n names the n-th descriptor of the array (so chains may loop);
 * a link at or above n is written unchanged. virtq_publish_raw() makes any head
 * index available, and virtq_advance_avail_raw() moves avail->idx without filling the
 * ring. The queue must be set up again (virtio_reinit) after using the last two.
 */
int virtq_add_raw(struct virtq *vq, const struct virtq_desc *d, u16 n, u64 token);
void virtq_publish_raw(struct virtq *vq, u16 head);
void virtq_advance_avail_raw(struct virtq *vq, u16 by);

#endif
