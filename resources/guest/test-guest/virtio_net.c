/*
 * virtio-net driver (virtio 1.x, section 5.1) and the tg.net modes: info, ping, serve and
 * bench. One receive queue (0) and one transmit queue (1); no control queue, no
 * offloads, no mergeable buffers, so every frame is a 12-byte struct virtio_net_hdr_v1
 * followed by the Ethernet frame. The guest speaks just enough IPv4 for the host to test
 * with: ARP, ICMP echo and UDP echo (port 7). Completions are polled. See
 * docs/test-guest.md for the output lines.
 */
#include "virtio_mmio.h"

#define VIRTIO_NET_F_MTU (1UL << 3)
#define VIRTIO_NET_F_MAC (1UL << 5)
#define VIRTIO_NET_F_STATUS (1UL << 16)

/* Configuration layout. */
#define NET_CFG_MAC 0x00    /* u8[6] */
#define NET_CFG_STATUS 0x06 /* u16 */
#define NET_CFG_MTU 0x0a    /* u16 */
#define VIRTIO_NET_S_LINK_UP 1

#define RXQ 0
#define TXQ 1
#define NET_QUEUE_SIZE VIRTQ_MAX_SIZE

/* struct virtio_net_hdr_v1: flags, gso_type, hdr_len, gso_size, csum_start, csum_offset,
 * num_buffers. */
#define NET_HDR 12
#define HDR_GSO_TYPE 1
#define HDR_NUM_BUFFERS 10

#define ETH_ALEN 6
#define ETH_HLEN 14
#define ETH_ZLEN 60 /* shortest frame (without FCS); shorter ones are padded */
#define VLAN_HLEN 4
#define ETH_P_IP 0x0800
#define ETH_P_ARP 0x0806
#define DEFAULT_MTU 1500
#define IP_HLEN 20
#define UDP_HLEN 8
#define ICMP_HLEN 8
#define IPPROTO_ICMP 1
#define IPPROTO_UDP 17
#define UDP_ECHO_PORT 7
#define ARP_LEN 28

/* Receive buffers and transmit slots: each is NET_HDR + frame, `stride` bytes apart. */
#define POOL_BYTES (128UL * 1024)
#define STRIDE_ALIGN 64

#define PING_ID 0x7467 /* "tg" */
#define PING_PAYLOAD 56
#define ARP_RESEND_PARTS 4 /* ARP requests sent per tg.net_timeout_ms */
#define MAX_ERROR_LINES 4
#define STOP_PAYLOAD "tg-stop"

static u8 rx_pool[POOL_BYTES] NOINIT __attribute__((aligned(4096)));
static u8 tx_pool[POOL_BYTES] NOINIT __attribute__((aligned(4096)));
/* Headers in their own descriptors (tg.net_split=1), away from the frames. */
static u8 rx_hdrs[VIRTQ_MAX_SIZE][16] NOINIT __attribute__((aligned(64)));
static u8 tx_hdrs[VIRTQ_MAX_SIZE][16] NOINIT __attribute__((aligned(64)));

static const u8 broadcast[ETH_ALEN] = { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff };

struct net {
	struct virtio_dev *dev;
	struct virtq *rxq, *txq;
	u32 index;        /* net<index>: position among the network devices */
	u8 mac[ETH_ALEN];
	u32 mtu;          /* from the configuration, or 1500 */
	u32 status;       /* from the configuration, or VIRTIO_NET_S_LINK_UP */
	int split;        /* header and frame in two descriptors */
	u32 descs;        /* descriptors per frame: 1 or 2 */
	u32 stride;       /* bytes per receive buffer / transmit slot, header included */
	u32 nr_rx;        /* receive buffers */
	u32 nr_tx;        /* transmit slots */
	u16 rx_head[VIRTQ_MAX_SIZE];     /* fixed chain of each receive buffer */
	u16 tx_head[VIRTQ_MAX_SIZE];     /* fixed chain of each transmit slot */
	u16 tx_len_desc[VIRTQ_MAX_SIZE]; /* its descriptor that holds the frame */
	u16 tx_free[VIRTQ_MAX_SIZE];
	u32 nr_tx_free;
	u32 ip, peer;     /* IPv4 addresses, host byte order */
	u8 peer_mac[ETH_ALEN];
	int have_peer_mac;
	u64 timeout_us;
	int broken;       /* the device returned something that was not in flight */
	u32 error_lines;
	int warned_num_buffers;
	u16 ip_id;
	/* answered requests */
	u64 arp_replies, icmp_replies, udp_echoes;
	int stop;         /* a "tg-stop" UDP echo request arrived */
	/* ping */
	u16 ping_seq;     /* sequence number waited for (0: none) */
	int ping_ok;
	/* receive benchmark */
	int count_udp;
	u64 udp_want, udp_frames, udp_bytes;
};

/* ---- helpers ---- */

/*
 * Big-endian fields with single loads and stores: every instruction counts where guest
 * code runs in an instruction emulator (x86 allows the unaligned accesses).
 */
static u16 get16(const u8 *p)
{
	return __builtin_bswap16(*(const u16 *)p);
}

static u32 get32(const u8 *p)
{
	return __builtin_bswap32(*(const u32 *)p);
}

static void put16(u8 *p, u16 v)
{
	*(u16 *)p = __builtin_bswap16(v);
}

static void put32(u8 *p, u32 v)
{
	*(u32 *)p = __builtin_bswap32(v);
}

static int mac_eq(const u8 *a, const u8 *b)
{
	return *(const u32 *)a == *(const u32 *)b && *(const u16 *)(a + 4) == *(const u16 *)(b + 4);
}

/*
 * Copies whole frames: on x86_64 rep movsq, then the rest bytewise (fewer emulated
 * iterations); elsewhere memcpy.
 */
static void copy_frame(u8 *dst, const u8 *src, size_t n)
{
#ifdef __x86_64__
	size_t q = n / 8;
	__asm__ volatile("rep movsq" : "+D"(dst), "+S"(src), "+c"(q) : : "memory");
	for (n %= 8; n; n--)
		*dst++ = *src++;
#else
	memcpy(dst, src, n);
#endif
}

/*
 * Internet checksum (RFC 1071), summed in the CPU's byte order, 32 bits at a time: the
 * one's complement sum does not depend on the byte order, so the folded result is
 * stored with a plain (little-endian) 16-bit store, and a correct checksum folds to 0
 * either way.
 */
static u64 csum_add(u64 sum, const u8 *p, u32 n)
{
	for (; n >= 4; p += 4, n -= 4)
		sum += *(const u32 *)p;
	if (n >= 2) {
		sum += *(const u16 *)p;
		p += 2;
		n -= 2;
	}
	if (n)
		sum += *p; /* the odd byte, padded with a zero byte */
	return sum;
}

static u16 csum_fold(u64 sum)
{
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return (u16)~sum;
}

static void put_csum(u8 *p, u16 csum)
{
	*(u16 *)p = csum;
}

static void print_mac(const u8 *m)
{
	tg_printf("%02x:%02x:%02x:%02x:%02x:%02x", m[0], m[1], m[2], m[3], m[4], m[5]);
}

static void print_ip(u32 ip)
{
	tg_printf("%u.%u.%u.%u", ip >> 24, (ip >> 16) & 0xff, (ip >> 8) & 0xff, ip & 0xff);
}

/*
 * Notify the device unless it asked not to be (used->flags bit 0, section 2.7.7). The
 * new avail->idx must be visible before the flag is read (a store-load order: a full
 * fence).
 */
static void notify(struct virtq *vq)
{
	mb();
	if (!(vq->used->flags & 1))
		virtq_kick(vq);
}

static void net_error(struct net *n, const char *what, u32 value)
{
	if (n->error_lines >= MAX_ERROR_LINES)
		return;
	n->error_lines++;
	tg_printf("net%u: rx error=%s value=%u\n", n->index, what, value);
}

/* ---- buffers ---- */

static u8 *rx_buf(const struct net *n, u32 i)
{
	return rx_pool + (size_t)i * n->stride;
}

static u8 *tx_buf(const struct net *n, u32 slot)
{
	return tx_pool + (size_t)slot * n->stride;
}

/* The Ethernet frame of a transmit slot (after the header space). */
static u8 *tx_frame(const struct net *n, u32 slot)
{
	return tx_buf(n, slot) + NET_HDR;
}

/*
 * Buffers stay on their descriptors: receive buffer i is one device-writable descriptor
 * (or header + frame), transmit slot s one device-readable descriptor (or header +
 * frame) whose frame length is set before each post. Returns 0, or -1 if the queue is
 * too small (cannot happen: nr_rx and nr_tx are cut to the queue sizes).
 */
static int chains_setup(struct net *n)
{
	struct virtq_buf b[2];

	for (u32 i = 0; i < n->nr_rx; i++) {
		u8 *buf = rx_buf(n, i);
		if (n->split) {
			b[0] = (struct virtq_buf){ (u64)rx_hdrs[i], NET_HDR, VIRTQ_DESC_F_WRITE };
			b[1] = (struct virtq_buf){ (u64)(buf + NET_HDR), n->stride - NET_HDR,
						   VIRTQ_DESC_F_WRITE };
		} else {
			b[0] = (struct virtq_buf){ (u64)buf, n->stride, VIRTQ_DESC_F_WRITE };
		}
		int head = virtq_add_fixed(n->rxq, b, n->descs, i);
		if (head < 0)
			return -1;
		n->rx_head[i] = (u16)head;
	}
	for (u32 s = 0; s < n->nr_tx; s++) {
		u8 *buf = tx_buf(n, s);
		if (n->split) {
			b[0] = (struct virtq_buf){ (u64)tx_hdrs[s], NET_HDR, 0 };
			b[1] = (struct virtq_buf){ (u64)(buf + NET_HDR), ETH_ZLEN, 0 };
		} else {
			b[0] = (struct virtq_buf){ (u64)buf, NET_HDR + ETH_ZLEN, 0 };
		}
		int head = virtq_add_fixed(n->txq, b, n->descs, s);
		if (head < 0)
			return -1;
		n->tx_head[s] = (u16)head;
		n->tx_len_desc[s] = virtq_desc_of(n->txq, (u16)head, n->descs - 1);
	}
	return 0;
}

/* Make receive buffer i available again. */
static void rx_post(struct net *n, u32 i)
{
	virtq_post(n->rxq, n->rx_head[i]);
}

/* Take the completed transmit chains back; returns how many. */
static u32 tx_reclaim(struct net *n)
{
	u32 done = 0;
	u64 slot;

	for (;;) {
		int r = virtq_get_used(n->txq, NULL, &slot);
		if (r == VIRTQ_NONE)
			break;
		if (r == VIRTQ_BAD) {
			n->broken = 1;
			break;
		}
		n->tx_free[n->nr_tx_free++] = (u16)slot;
		done++;
	}
	return done;
}

static void check_needs_reset(const struct net *n)
{
	if (virtio_needs_reset(n->dev))
		tg_printf("virtio: slot=%u error=device-needs-reset\n", n->dev->slot);
}

/* A free transmit slot, waiting up to tg.net_timeout_ms for one; -1 if none. */
static int tx_slot(struct net *n)
{
	if (n->broken)
		return -1;
	if (n->nr_tx_free == 0 && tx_reclaim(n) == 0) {
		u64 deadline = tsc_deadline_us(n->timeout_us);
		while (tx_reclaim(n) == 0 && !n->broken) {
			if (tsc_passed(deadline)) {
				tg_printf("net%u: tx timeout\n", n->index);
				check_needs_reset(n);
				n->broken = 1;
				return -1;
			}
			cpu_relax();
		}
		virtio_ack_interrupt(n->dev->base);
	}
	if (n->broken)
		return -1;
	return n->tx_free[--n->nr_tx_free];
}

/* Make the frame of len bytes in slot available to the device (no notification). */
static void tx_add(struct net *n, u32 slot, u32 len)
{
	n->txq->desc[n->tx_len_desc[slot]].len = n->split ? len : NET_HDR + len;
	virtq_post(n->txq, n->tx_head[slot]);
}

/* Send the frame of len bytes built in slot: zero header, padding to 60 bytes. */
static void tx_send(struct net *n, u32 slot, u32 len)
{
	u8 *frame = tx_frame(n, slot);

	memset(n->split ? tx_hdrs[slot] : tx_buf(n, slot), 0, NET_HDR);
	if (len < ETH_ZLEN) {
		memset(frame + len, 0, ETH_ZLEN - len);
		len = ETH_ZLEN;
	}
	tx_add(n, slot, len);
	notify(n->txq);
}

/* ---- frames ---- */

static void eth_header(u8 *f, const u8 *dst, const u8 *src, u16 type)
{
	memcpy(f, dst, ETH_ALEN);
	memcpy(f + ETH_ALEN, src, ETH_ALEN);
	put16(f + 12, type);
}

/* 20-byte IPv4 header (DF, TTL 64) for len bytes of payload. */
static void ip_header(struct net *n, u8 *ip, u32 dst, u8 proto, u32 len)
{
	ip[0] = 0x45;
	ip[1] = 0;
	put16(ip + 2, (u16)(IP_HLEN + len));
	put16(ip + 4, n->ip_id++);
	put16(ip + 6, 0x4000);
	ip[8] = 64;
	ip[9] = proto;
	put16(ip + 10, 0);
	put32(ip + 12, n->ip);
	put32(ip + 16, dst);
	put_csum(ip + 10, csum_fold(csum_add(0, ip, IP_HLEN)));
}

static void send_arp(struct net *n, u16 op, const u8 *eth_dst, const u8 *tha, u32 tpa)
{
	int slot = tx_slot(n);
	if (slot < 0)
		return;
	u8 *f = tx_frame(n, (u32)slot), *a = f + ETH_HLEN;
	eth_header(f, eth_dst, n->mac, ETH_P_ARP);
	put16(a, 1);            /* Ethernet */
	put16(a + 2, ETH_P_IP);
	a[4] = ETH_ALEN;
	a[5] = 4;
	put16(a + 6, op);
	memcpy(a + 8, n->mac, ETH_ALEN);
	put32(a + 14, n->ip);
	memcpy(a + 18, tha, ETH_ALEN);
	put32(a + 24, tpa);
	tx_send(n, (u32)slot, ETH_HLEN + ARP_LEN);
}

static void arp_in(struct net *n, const u8 *f, u32 len)
{
	const u8 *a = f + ETH_HLEN;

	if (len < ETH_HLEN + ARP_LEN || get16(a) != 1 || get16(a + 2) != ETH_P_IP ||
	    a[4] != ETH_ALEN || a[5] != 4)
		return;
	u16 op = get16(a + 6);
	u32 spa = get32(a + 14), tpa = get32(a + 24);
	if (spa == n->peer && (op == 1 || op == 2)) {
		memcpy(n->peer_mac, a + 8, ETH_ALEN);
		n->have_peer_mac = 1;
	}
	if (op == 1 && tpa == n->ip) {
		send_arp(n, 2, a + 8, a + 8, spa);
		n->arp_replies++;
	}
}

/* Payload byte i of echo request seq. */
static u8 ping_byte(u16 seq, u32 i)
{
	return (u8)(seq * 7 + i);
}

static void icmp_in(struct net *n, const u8 *f, const u8 *ip, u32 hl, u32 tot)
{
	const u8 *icmp = ip + hl;
	u32 ilen = tot - hl;

	if (ilen < ICMP_HLEN || icmp[1] != 0)
		return;
	if (icmp[0] == 8) { /* echo request: the same ICMP message back with type 0 */
		int slot = tx_slot(n);
		if (slot < 0)
			return;
		u8 *o = tx_frame(n, (u32)slot), *oip = o + ETH_HLEN, *oicmp = oip + IP_HLEN;
		eth_header(o, f + ETH_ALEN, n->mac, ETH_P_IP);
		ip_header(n, oip, get32(ip + 12), IPPROTO_ICMP, ilen);
		copy_frame(oicmp, icmp, ilen);
		oicmp[0] = 0;
		/* RFC 1624: HC' = ~(~HC + ~m + m'), the first word (type, code) going from
		 * 8, 0 to 0, 0; in the CPU's byte order, like csum_add(). */
		u64 sum = (u16)~*(const u16 *)(icmp + 2) + (u16)~*(const u16 *)icmp + 0;
		put_csum(oicmp + 2, csum_fold(sum));
		tx_send(n, (u32)slot, ETH_HLEN + IP_HLEN + ilen);
		n->icmp_replies++;
	} else if (icmp[0] == 0 && n->ping_seq && get32(ip + 12) == n->peer &&
		   get16(icmp + 4) == PING_ID && get16(icmp + 6) == n->ping_seq &&
		   ilen == ICMP_HLEN + PING_PAYLOAD &&
		   csum_fold(csum_add(0, icmp, ilen)) == 0) {
		for (u32 i = 0; i < PING_PAYLOAD; i++)
			if (icmp[ICMP_HLEN + i] != ping_byte(n->ping_seq, i))
				return;
		n->ping_ok = 1;
	}
}

static void udp_in(struct net *n, const u8 *f, const u8 *ip, u32 hl, u32 tot)
{
	const u8 *udp = ip + hl;
	u32 ulen;

	if (tot - hl < UDP_HLEN)
		return;
	ulen = get16(udp + 4);
	if (ulen < UDP_HLEN || ulen > tot - hl)
		return;
	if (get16(udp + 2) == UDP_ECHO_PORT) {
		int slot = tx_slot(n);
		if (slot < 0)
			return;
		u8 *o = tx_frame(n, (u32)slot), *oip = o + ETH_HLEN, *oudp = oip + IP_HLEN;
		eth_header(o, f + ETH_ALEN, n->mac, ETH_P_IP);
		ip_header(n, oip, get32(ip + 12), IPPROTO_UDP, ulen);
		/* Ports swapped; with the addresses swapped too the checksum stays valid. */
		put16(oudp, UDP_ECHO_PORT);
		put16(oudp + 2, get16(udp));
		put16(oudp + 4, (u16)ulen);
		put16(oudp + 6, get16(udp + 6));
		copy_frame(oudp + UDP_HLEN, udp + UDP_HLEN, ulen - UDP_HLEN);
		tx_send(n, (u32)slot, ETH_HLEN + IP_HLEN + ulen);
		n->udp_echoes++;
		if (ulen - UDP_HLEN == sizeof(STOP_PAYLOAD) - 1 &&
		    memcmp(udp + UDP_HLEN, STOP_PAYLOAD, sizeof(STOP_PAYLOAD) - 1) == 0)
			n->stop = 1;
	} else if (n->count_udp && n->udp_frames < n->udp_want) {
		n->udp_frames++;
		n->udp_bytes += ulen - UDP_HLEN;
	}
}

static void ip_in(struct net *n, const u8 *f, u32 len)
{
	const u8 *ip = f + ETH_HLEN;
	u32 iplen = len - ETH_HLEN;

	if (iplen < IP_HLEN || ip[0] >> 4 != 4)
		return;
	u32 hl = (ip[0] & 0xf) * 4U, tot = get16(ip + 2);
	if (hl < IP_HLEN || tot < hl || tot > iplen)
		return;
	if (csum_fold(csum_add(0, ip, hl)) != 0 || get32(ip + 16) != n->ip)
		return;
	if (get16(ip + 6) & 0x3fff)
		return; /* a fragment */
	if (ip[9] == IPPROTO_ICMP)
		icmp_in(n, f, ip, hl, tot);
	else if (ip[9] == IPPROTO_UDP)
		udp_in(n, f, ip, hl, tot);
}

/* One used receive buffer: header checks, then the frame. */
static void rx_one(struct net *n, u32 i, u32 len)
{
	const u8 *hdr = n->split ? rx_hdrs[i] : rx_buf(n, i);
	const u8 *f = rx_buf(n, i) + NET_HDR;

	if (len < NET_HDR + ETH_HLEN || len > n->stride) {
		net_error(n, "bad-len", len);
		return;
	}
	if (hdr[HDR_GSO_TYPE] != 0) {
		net_error(n, "gso-type", hdr[HDR_GSO_TYPE]);
		return;
	}
	u16 nb = (u16)(hdr[HDR_NUM_BUFFERS] | hdr[HDR_NUM_BUFFERS + 1] << 8);
	if (nb != 1 && !n->warned_num_buffers) {
		/* The device must write 1 without VIRTIO_NET_F_MRG_RXBUF (5.1.6.4.1). */
		n->warned_num_buffers = 1;
		tg_printf("net%u: warning=num-buffers value=%u\n", n->index, nb);
	}
	len -= NET_HDR;
	if (!mac_eq(f, n->mac) && !mac_eq(f, broadcast))
		return;
	u16 type = get16(f + 12);
	if (type == ETH_P_ARP)
		arp_in(n, f, len);
	else if (type == ETH_P_IP)
		ip_in(n, f, len);
}

/*
 * Handle what the device returned: received frames (answered, then their buffers
 * posted again) and finished transmissions. Returns the number of completions.
 */
static u32 net_poll(struct net *n)
{
	u32 events = 0, reposted = 0;
	u32 len;
	u64 tok;

	if (n->broken)
		return 0;
	for (u32 k = 0; k < n->nr_rx; k++) {
		int r = virtq_get_used(n->rxq, &len, &tok);
		if (r == VIRTQ_NONE)
			break;
		if (r == VIRTQ_BAD) {
			n->broken = 1;
			return events;
		}
		events++;
		rx_one(n, (u32)tok, len);
		rx_post(n, (u32)tok);
		reposted++;
	}
	if (reposted)
		notify(n->rxq);
	events += tx_reclaim(n);
	if (events)
		virtio_ack_interrupt(n->dev->base);
	return events;
}

/*
 * Poll until *flag is set or timeout_us has passed (checked every round, so that a
 * stream of other frames cannot hold the wait open). Returns *flag.
 */
static int poll_until(struct net *n, const int *flag, u64 timeout_us)
{
	u64 deadline = tsc_deadline_us(timeout_us);

	while (!*(volatile const int *)flag && !n->broken && !tsc_passed(deadline))
		if (!net_poll(n))
			cpu_relax();
	return *flag;
}

/* ---- set-up ---- */

static int setup(struct net *n, struct virtio_dev *d, u32 index, const struct tg_opts *o)
{
	n->dev = d;
	n->rxq = &d->vq[RXQ];
	n->txq = &d->vq[TXQ];
	n->index = index;
	n->split = o->net_split;
	n->descs = n->split ? 2 : 1;
	n->ip = o->net_ip;
	n->peer = o->net_peer;
	n->have_peer_mac = 0;
	n->timeout_us = o->net_timeout_ms * 1000;
	n->broken = 0;
	n->error_lines = 0;
	n->warned_num_buffers = 0;
	n->ip_id = 1;
	n->arp_replies = n->icmp_replies = n->udp_echoes = 0;
	n->stop = 0;
	n->ping_seq = 0;
	n->ping_ok = 0;
	n->count_udp = 0;

	if (virtio_init(d, VIRTIO_NET_F_MAC | VIRTIO_NET_F_MTU | VIRTIO_NET_F_STATUS) != 0 ||
	    virtio_setup_queue(d, RXQ, NET_QUEUE_SIZE) != 0 ||
	    virtio_setup_queue(d, TXQ, NET_QUEUE_SIZE) != 0)
		goto err;
	if (n->rxq->size < n->descs || n->txq->size < n->descs) {
		tg_printf("net%u: error=queue-too-small rx=%u tx=%u\n", index, n->rxq->size,
			  n->txq->size);
		goto err;
	}

	if (virtio_has(d, VIRTIO_NET_F_MAC)) {
		virtio_config_read(d, NET_CFG_MAC, n->mac, ETH_ALEN);
	} else { /* locally administered 06:00:<tg.ip> */
		n->mac[0] = 0x06;
		n->mac[1] = 0x00;
		put32(n->mac + 2, n->ip);
	}
	n->mtu = DEFAULT_MTU;
	if (virtio_has(d, VIRTIO_NET_F_MTU)) {
		u16 mtu;
		virtio_config_read(d, NET_CFG_MTU, &mtu, sizeof(mtu));
		n->mtu = mtu;
	}
	n->status = VIRTIO_NET_S_LINK_UP;
	if (virtio_has(d, VIRTIO_NET_F_STATUS)) {
		u16 st;
		virtio_config_read(d, NET_CFG_STATUS, &st, sizeof(st));
		n->status = st;
	}

	/* Room for a frame of the MTU (at least 1500) with a VLAN tag, after the header. */
	u32 payload = n->mtu > DEFAULT_MTU ? n->mtu : DEFAULT_MTU;
	n->stride = (NET_HDR + ETH_HLEN + VLAN_HLEN + payload + STRIDE_ALIGN - 1) &
		    ~(u32)(STRIDE_ALIGN - 1);
	u32 fit = (u32)(POOL_BYTES / n->stride);
	n->nr_rx = n->rxq->size / n->descs;
	if (n->nr_rx > fit)
		n->nr_rx = fit;
	n->nr_tx = n->txq->size / n->descs;
	if (n->nr_tx > fit)
		n->nr_tx = fit;
	n->nr_tx_free = 0;
	for (u32 s = n->nr_tx; s > 0; s--)
		n->tx_free[n->nr_tx_free++] = (u16)(s - 1);

	if (chains_setup(n) != 0)
		goto err;
	/* Receive buffers are posted after DRIVER_OK: no notification before it (3.1.1). */
	if (virtio_driver_ok(d) != 0)
		goto err;
	for (u32 i = 0; i < n->nr_rx; i++)
		rx_post(n, i);
	notify(n->rxq);
	return 0;
err:
	tg_printf("net%u: error=init slot=%u\n", index, d->slot);
	return -1;
}

/* ---- modes ---- */

static void mode_info(struct net *n)
{
	tg_printf("net%u: mac=", n->index);
	print_mac(n->mac);
	tg_printf(" mtu=%u status=%u\n", n->mtu, n->status);
	tg_printf("net%u: features=0x%lx offered=0x%lx rx_buffers=%u tx_slots=%u buffer=%u descs_per_frame=%u\n",
		  n->index, n->dev->features, n->dev->offered, n->nr_rx, n->nr_tx, n->stride, n->descs);
}

/* ARP for the peer, resending ARP_RESEND_PARTS times per tg.net_timeout_ms. */
static int resolve_peer(struct net *n)
{
	for (u32 i = 0; i < ARP_RESEND_PARTS && !n->have_peer_mac && !n->broken; i++) {
		static const u8 unknown[ETH_ALEN];
		send_arp(n, 1, broadcast, unknown, n->peer);
		poll_until(n, &n->have_peer_mac, n->timeout_us / ARP_RESEND_PARTS);
	}
	return n->have_peer_mac;
}

static void send_ping(struct net *n, u16 seq)
{
	int slot = tx_slot(n);
	if (slot < 0)
		return;
	u8 *f = tx_frame(n, (u32)slot), *ip = f + ETH_HLEN, *icmp = ip + IP_HLEN;
	eth_header(f, n->peer_mac, n->mac, ETH_P_IP);
	ip_header(n, ip, n->peer, IPPROTO_ICMP, ICMP_HLEN + PING_PAYLOAD);
	icmp[0] = 8;
	icmp[1] = 0;
	put16(icmp + 2, 0);
	put16(icmp + 4, PING_ID);
	put16(icmp + 6, seq);
	for (u32 i = 0; i < PING_PAYLOAD; i++)
		icmp[ICMP_HLEN + i] = ping_byte(seq, i);
	put_csum(icmp + 2, csum_fold(csum_add(0, icmp, ICMP_HLEN + PING_PAYLOAD)));
	tx_send(n, (u32)slot, ETH_HLEN + IP_HLEN + ICMP_HLEN + PING_PAYLOAD);
}

static void mode_ping(struct net *n, const struct tg_opts *o)
{
	u64 count = o->ping_count, ok = 0;

	int resolved = resolve_peer(n);
	tg_printf("net%u: arp peer=", n->index);
	print_ip(n->peer);
	if (!resolved) {
		tg_printf(" timeout\n");
		check_needs_reset(n);
		tg_printf("net%u: ping done ok=0/%lu\n", n->index, count);
		return;
	}
	tg_printf(" mac=");
	print_mac(n->peer_mac);
	tg_printf("\n");

	for (u64 seq = 1; seq <= count; seq++) {
		n->ping_seq = (u16)seq ? (u16)seq : 1;
		n->ping_ok = 0;
		send_ping(n, n->ping_seq);
		if (poll_until(n, &n->ping_ok, n->timeout_us)) {
			ok++;
			tg_printf("net%u: ping seq=%lu ok\n", n->index, seq);
		} else {
			tg_printf("net%u: ping seq=%lu timeout\n", n->index, seq);
			check_needs_reset(n);
		}
	}
	n->ping_seq = 0;
	tg_printf("net%u: ping done ok=%lu/%lu\n", n->index, ok, count);
}

static void mode_serve(struct net *n, const struct tg_opts *o)
{
	u64 deadline = tsc_deadline_us(o->serve_ms * 1000);

	tg_printf("net%u: serve ready ip=", n->index);
	print_ip(n->ip);
	tg_printf(" mac=");
	print_mac(n->mac);
	tg_printf("\n");
	while (!n->stop && !n->broken && !(o->serve_ms && tsc_passed(deadline)))
		if (!net_poll(n))
			cpu_relax();
	tg_printf("net%u: serve done arp=%lu icmp=%lu udp=%lu\n", n->index, n->arp_replies,
		  n->icmp_replies, n->udp_echoes);
}

/* UDP datagrams of size bytes to the peer's port, as fast as the queue takes them. */
static void bench_tx(struct net *n, const struct tg_opts *o, u32 size)
{
	u64 frames = o->net_frames, sent = 0;
	u32 flen = ETH_HLEN + IP_HLEN + UDP_HLEN + size;

	/* Wait for earlier frames (ARP) so that every slot is free. */
	u64 deadline = tsc_deadline_us(n->timeout_us);
	while (n->nr_tx_free < n->nr_tx && !n->broken) {
		tx_reclaim(n);
		if (tsc_passed(deadline)) {
			tg_printf("netbench: tx timeout sent=0\n");
			check_needs_reset(n);
			return;
		}
		cpu_relax();
	}
	if (n->broken) {
		tg_printf("netbench: tx error sent=0\n");
		return;
	}

	/* Every slot holds the same datagram; only its sequence number changes. */
	u8 *t = tx_frame(n, 0), *ip = t + ETH_HLEN, *udp = ip + IP_HLEN;
	eth_header(t, n->peer_mac, n->mac, ETH_P_IP);
	ip_header(n, ip, n->peer, IPPROTO_UDP, UDP_HLEN + size);
	put16(udp, (u16)o->net_port);
	put16(udp + 2, (u16)o->net_port);
	put16(udp + 4, (u16)(UDP_HLEN + size));
	put16(udp + 6, 0); /* no checksum */
	for (u32 i = 0; i < size; i++)
		udp[UDP_HLEN + i] = (u8)i;
	memset(tx_buf(n, 0), 0, NET_HDR);
	for (u32 s = 1; s < n->nr_tx; s++)
		copy_frame(tx_buf(n, s), tx_buf(n, 0), NET_HDR + flen);
	for (u32 s = 0; s < n->nr_tx; s++) {
		memset(tx_hdrs[s], 0, NET_HDR);
		n->tx_free[s] = (u16)s;
	}
	n->nr_tx_free = n->nr_tx;
	u32 send_len = flen < ETH_ZLEN ? ETH_ZLEN : flen;
	if (flen < ETH_ZLEN)
		for (u32 s = 0; s < n->nr_tx; s++)
			memset(tx_frame(n, s) + flen, 0, ETH_ZLEN - flen);

	u64 t0 = rdtsc();
	deadline = tsc_deadline_us(n->timeout_us);
	while (sent < frames || n->nr_tx_free < n->nr_tx) {
		u32 progress = tx_reclaim(n), added = 0;
		if (n->broken) {
			tg_printf("netbench: tx error sent=%lu\n", sent);
			return;
		}
		while (sent < frames && n->nr_tx_free) {
			u32 slot = n->tx_free[--n->nr_tx_free];
			if (size >= 4)
				put32(tx_frame(n, slot) + ETH_HLEN + IP_HLEN + UDP_HLEN, (u32)sent);
			tx_add(n, slot, send_len);
			sent++;
			added++;
		}
		if (added)
			notify(n->txq);
		if (progress)
			virtio_ack_interrupt(n->dev->base);
		if (progress + added) {
			deadline = tsc_deadline_us(n->timeout_us);
		} else if (tsc_passed(deadline)) {
			tg_printf("netbench: tx timeout sent=%lu\n", sent);
			check_needs_reset(n);
			return;
		} else {
			cpu_relax();
		}
	}
	u64 us = tsc_cycles_to_us(rdtsc() - t0);
	tg_printf("netbench: tx frames=%lu bytes=%lu us=%lu\n", frames, frames * size, us);
}

/* Count the UDP datagrams the host sends (any port but 7) until tg.net_rx_frames. */
static void bench_rx(struct net *n, const struct tg_opts *o)
{
	n->count_udp = 1;
	n->udp_want = o->net_rx_frames;
	n->udp_frames = n->udp_bytes = 0;
	tg_printf("netbench: rx ready\n");
	/*
	 * Time stamps per poll round (a round takes up to rx_buffers frames): from the start
	 * of the round that found the first datagram to the end of the one with the last.
	 */
	u64 first = 0, last = 0;
	u64 deadline = tsc_deadline_us(n->timeout_us);
	while (n->udp_frames < n->udp_want && !n->broken) {
		u64 before = n->udp_frames, now = rdtsc();
		if (net_poll(n) && n->udp_frames != before) {
			if (before == 0)
				first = now;
			last = rdtsc();
			deadline = tsc_deadline_us(n->timeout_us);
		} else if ((i64)(now - deadline) >= 0) {
			break;
		} else {
			cpu_relax();
		}
	}
	n->count_udp = 0;
	u64 us = tsc_cycles_to_us(last - first);
	if (n->udp_frames < n->udp_want)
		tg_printf("netbench: rx timeout frames=%lu/%lu bytes=%lu us=%lu\n", n->udp_frames,
			  n->udp_want, n->udp_bytes, us);
	else
		tg_printf("netbench: rx frames=%lu bytes=%lu us=%lu\n", n->udp_frames,
			  n->udp_bytes, us);
}

static void mode_bench(struct net *n, const struct tg_opts *o)
{
	u64 size = o->net_size, max = n->mtu > IP_HLEN + UDP_HLEN ? n->mtu - IP_HLEN - UDP_HLEN : 0;

	if (size > max)
		size = max;
	tsc_report();
	tg_printf("netbench: dev=net%u mac=", n->index);
	print_mac(n->mac);
	tg_printf(" mtu=%u size=%lu rx_buffers=%u tx_slots=%u descs_per_frame=%u\n", n->mtu, size,
		  n->nr_rx, n->nr_tx, n->descs);
	if (!resolve_peer(n)) {
		tg_printf("netbench: arp timeout peer=");
		print_ip(n->peer);
		tg_printf("\n");
		check_needs_reset(n);
		return;
	}
	if (o->net_frames)
		bench_tx(n, o, (u32)size);
	if (o->net_rx_frames && !n->broken)
		bench_rx(n, o);
}

/* ---- entry ---- */

void virtio_net_run(const struct tg_opts *o)
{
	struct net n;
	u32 index = 0, found = 0;

	for (u32 slot = 0; slot < virtio_count(); slot++) {
		struct virtio_dev *d = virtio_get(slot);
		if (!d->usable || d->device_id != VIRTIO_ID_NET)
			continue;
		u32 i = index++;
		if (o->net != NET_INFO && i != o->net_dev)
			continue;
		found = 1;
		if (setup(&n, d, i, o) != 0)
			continue;
		switch (o->net) {
		case NET_INFO:
			mode_info(&n);
			break;
		case NET_PING:
			mode_ping(&n, o);
			break;
		case NET_SERVE:
			mode_serve(&n, o);
			break;
		case NET_BENCH:
			mode_bench(&n, o);
			break;
		case NET_OFF:
			break;
		}
	}
	if (!found) {
		if (index == 0)
			tg_printf("net: none\n");
		else
			tg_printf("net: no device net%lu\n", o->net_dev);
	}
}
