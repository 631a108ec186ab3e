/*
 * virtio-mmio transport, version 2 (virtio 1.x, section 4.2.2). Devices come from the
 * command line ("virtio_mmio.device=<size>@<base>:<irq>"); every register access is a
 * 32-bit access to the uncached mapping of [3 GiB, 4 GiB).
 */
#ifndef TG_VIRTIO_MMIO_H
#define TG_VIRTIO_MMIO_H

#include "tg.h"
#include "virtqueue.h"

/* Registers. */
#define VIRTIO_MMIO_MAGIC_VALUE 0x000
#define VIRTIO_MMIO_VERSION 0x004
#define VIRTIO_MMIO_DEVICE_ID 0x008
#define VIRTIO_MMIO_VENDOR_ID 0x00c
#define VIRTIO_MMIO_DEVICE_FEATURES 0x010
#define VIRTIO_MMIO_DEVICE_FEATURES_SEL 0x014
#define VIRTIO_MMIO_DRIVER_FEATURES 0x020
#define VIRTIO_MMIO_DRIVER_FEATURES_SEL 0x024
#define VIRTIO_MMIO_QUEUE_SEL 0x030
#define VIRTIO_MMIO_QUEUE_NUM_MAX 0x034
#define VIRTIO_MMIO_QUEUE_NUM 0x038
#define VIRTIO_MMIO_QUEUE_READY 0x044
#define VIRTIO_MMIO_QUEUE_NOTIFY 0x050
#define VIRTIO_MMIO_INTERRUPT_STATUS 0x060
#define VIRTIO_MMIO_INTERRUPT_ACK 0x064
#define VIRTIO_MMIO_STATUS 0x070
#define VIRTIO_MMIO_QUEUE_DESC_LOW 0x080
#define VIRTIO_MMIO_QUEUE_DESC_HIGH 0x084
#define VIRTIO_MMIO_QUEUE_DRIVER_LOW 0x090
#define VIRTIO_MMIO_QUEUE_DRIVER_HIGH 0x094
#define VIRTIO_MMIO_QUEUE_DEVICE_LOW 0x0a0
#define VIRTIO_MMIO_QUEUE_DEVICE_HIGH 0x0a4
#define VIRTIO_MMIO_CONFIG_GENERATION 0x0fc
#define VIRTIO_MMIO_CONFIG 0x100

#define VIRTIO_MMIO_MAGIC 0x74726976 /* "virt" */
#define VIRTIO_MMIO_MIN_SIZE 0x100   /* the registers, without device configuration */

/* Device status bits. */
#define VIRTIO_STATUS_ACKNOWLEDGE 0x01
#define VIRTIO_STATUS_DRIVER 0x02
#define VIRTIO_STATUS_DRIVER_OK 0x04
#define VIRTIO_STATUS_FEATURES_OK 0x08
#define VIRTIO_STATUS_NEEDS_RESET 0x40
#define VIRTIO_STATUS_FAILED 0x80

/* Interrupt status bits. */
#define VIRTIO_INT_USED_RING 0x1
#define VIRTIO_INT_CONFIG 0x2

/* Feature bits independent of the device type. */
#define VIRTIO_F_VERSION_1 (1UL << 32)

/* Device IDs. */
#define VIRTIO_ID_NET 1
#define VIRTIO_ID_BLOCK 2
#define VIRTIO_ID_RNG 4
#define VIRTIO_ID_BALLOON 5

/* Queues per device the transport keeps (virtio-vsock: receive, transmit, event; virtio-balloon:
 * inflate, deflate, stats). */
#define VIRTIO_MAX_QUEUES 3

struct virtio_dev {
	u32 slot; /* position among the virtio_mmio.device= entries */
	u64 base;
	u64 size;
	u32 irq;
	int usable;     /* mapped, magic value right: the ID registers below are valid */
	u32 version;
	u32 device_id;
	u32 vendor_id;
	u64 wanted;     /* features the driver asked for (kept for re-initialisation) */
	u64 offered;    /* device features */
	u64 features;   /* negotiated */
	u32 nr_queues;  /* queues set up */
	u16 queue_size[VIRTIO_MAX_QUEUES]; /* requested sizes (kept for re-initialisation) */
	struct virtq vq[VIRTIO_MAX_QUEUES];
};

u32 virtio_count(void);
struct virtio_dev *virtio_get(u32 slot);

static inline u32 virtio_read(const struct virtio_dev *d, u32 reg)
{
	return mmio_read32(d->base + reg);
}

static inline void virtio_write(const struct virtio_dev *d, u32 reg, u32 v)
{
	mmio_write32(d->base + reg, v);
}

static inline int virtio_has(const struct virtio_dev *d, u64 feature)
{
	return (d->features & feature) != 0;
}

/*
 * Driver initialisation, in the order of virtio 1.x section 3.1.1:
 *   virtio_init()        reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK (re-read)
 *   virtio_setup_queue() once per queue, indices 0, 1, ...
 *   (device configuration, buffers)
 *   virtio_driver_ok()   DRIVER_OK
 * Each returns 0 on success; on failure it has printed
 * "virtio: slot=<i> error=<what>" and set FAILED.
 */
int virtio_init(struct virtio_dev *d, u64 wanted);
int virtio_setup_queue(struct virtio_dev *d, u16 index, u16 size);
int virtio_driver_ok(struct virtio_dev *d);
/* Reset, then the same features and queues again (rings emptied), then DRIVER_OK. */
int virtio_reinit(struct virtio_dev *d);
int virtio_reset(struct virtio_dev *d);

u32 virtio_status(const struct virtio_dev *d);
int virtio_needs_reset(const struct virtio_dev *d);
/* Read and acknowledge the interrupt status, which deasserts the interrupt line. */
u32 virtio_ack_interrupt(u64 mmio_base);

/* Device configuration, read with 32-bit accesses and retried until ConfigGeneration is stable. */
void virtio_config_read(const struct virtio_dev *d, u32 off, void *buf, u32 len);
u32 virtio_config_read32(const struct virtio_dev *d, u32 off);
u64 virtio_config_read64(const struct virtio_dev *d, u32 off);

#endif
