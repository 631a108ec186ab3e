/*
 * virtio-vsock driver (virtio 1.x, section 5.10), stream sockets only, polled, one
 * connection at a time, and tg.vsock=MODE:
 *   listen   accept host connections on tg.vsock_port (tg.vsock_count of them, 0 = until
 *            tg.vsock_timeout_ms passes without traffic); echo every payload back
 *   connect  connect to the host (CID 2) port tg.vsock_port, send "hello from guest\n",
 *            print what comes back, close
 *   hostile  send malformed packets, a descriptor loop and a credit overrun (against host
 *            port tg.vsock_port + 1, which must not read), then listen as above
 * Lines (see docs/test-guest.md):
 *   vsock: cid=<n>
 *   vsock: accepted port=<guest port> peer=<host port>
 *   vsock: echoed <n> bytes
 *   vsock: peer closed | vsock: reset
 *   vsock: refused request for port=<p>   (listen: a request for another port)
 *   vsock: connected port=<p> | vsock: refused port=<p>
 *   vsock: received <text>
 *   vsock: transport reset
 *   vsock: hostile resets=<n>
 *   vsock: overrun reset after <n> bytes | vsock: overrun no reset
 *   vsock: done rx_dropped=<n> | vsock: none | vsock: error <what>
 */
#include "virtio_mmio.h"

#define VIRTIO_ID_VSOCK 19
#define VQ_SIZE 16
#define RX_BUFS 8
#define BUF_BYTES 4096
#define HDR 44
#define HOST_CID 2
#define TYPE_STREAM 1
#define OP_REQUEST 1
#define OP_RESPONSE 2
#define OP_RST 3
#define OP_SHUTDOWN 4
#define OP_RW 5
#define OP_CREDIT_UPDATE 6
#define GUEST_BUF_ALLOC (64 * 1024)
#define EVENT_TRANSPORT_RESET 0

struct hdr {
	u64 src_cid;
	u64 dst_cid;
	u32 src_port;
	u32 dst_port;
	u32 len;
	u16 type;
	u16 op;
	u32 flags;
	u32 buf_alloc;
	u32 fwd_cnt;
} __attribute__((packed));

static u8 rx_bufs[RX_BUFS][BUF_BYTES] NOINIT __attribute__((aligned(4096)));
static u8 tx_buf[BUF_BYTES] NOINIT __attribute__((aligned(4096)));
static u8 ev_buf[2][8] NOINIT __attribute__((aligned(64)));

struct vs {
	struct virtio_dev *d;
	u64 cid;
	u16 rx_head[RX_BUFS];
	u64 timeout_us;
	/* The one connection: ports, what we forwarded, and whether it is open. */
	int open;
	u32 local_port, peer_port;
	u32 fwd_cnt;
	u32 rsts;       /* RSTs seen (hostile accounting) */
	u32 rx_dropped; /* receive buffers the device returned empty */
};

static struct vs vs NOINIT;

static struct virtq *rxq(void) { return &vs.d->vq[0]; }
static struct virtq *txq(void) { return &vs.d->vq[1]; }
static struct virtq *evq(void) { return &vs.d->vq[2]; }

static int post_buffers(void)
{
	for (u32 i = 0; i < RX_BUFS; i++) {
		struct virtq_buf b = { (u64)rx_bufs[i], BUF_BYTES, VIRTQ_DESC_F_WRITE };
		int head = virtq_add_fixed(rxq(), &b, 1, i);
		if (head < 0)
			return -1;
		vs.rx_head[i] = (u16)head;
		virtq_post(rxq(), (u16)head);
	}
	virtq_kick(rxq());
	for (u32 i = 0; i < 2; i++) {
		struct virtq_buf b = { (u64)ev_buf[i], sizeof(ev_buf[i]), VIRTQ_DESC_F_WRITE };
		if (virtq_add(evq(), &b, 1, i) < 0)
			return -1;
	}
	virtq_kick(evq());
	return 0;
}

static int setup(struct virtio_dev *d)
{
	vs.d = d;
	if (virtio_init(d, 0) != 0 || virtio_setup_queue(d, 0, VQ_SIZE) != 0 ||
	    virtio_setup_queue(d, 1, VQ_SIZE) != 0 || virtio_setup_queue(d, 2, VQ_SIZE) != 0)
		return -1;
	vs.cid = virtio_config_read64(d, 0);
	if (post_buffers() != 0 || virtio_driver_ok(d) != 0)
		return -1;
	return 0;
}

/* Sends one packet from tx_buf (header already there, payload after it); waits for it. */
static int send_raw(u32 total)
{
	struct virtq_buf b = { (u64)tx_buf, total, 0 };
	u32 len;
	if (virtq_add(txq(), &b, 1, 0) < 0)
		return -1;
	virtq_kick(txq());
	return virtq_wait_used(txq(), vs.timeout_us, &len, NULL) == VIRTQ_DONE ? 0 : -1;
}

static struct hdr *tx_hdr(void)
{
	return (struct hdr *)tx_buf;
}

/* Writes a packet of the connection into tx_buf without sending it. */
static void fill_pkt(u16 op, u32 flags, const void *payload, u32 len)
{
	struct hdr *h = tx_hdr();
	h->src_cid = vs.cid;
	h->dst_cid = HOST_CID;
	h->src_port = vs.local_port;
	h->dst_port = vs.peer_port;
	h->len = len;
	h->type = TYPE_STREAM;
	h->op = op;
	h->flags = flags;
	h->buf_alloc = GUEST_BUF_ALLOC;
	h->fwd_cnt = vs.fwd_cnt;
	if (len)
		memcpy(tx_buf + HDR, payload, len);
}

static int send_pkt(u16 op, u32 flags, const void *payload, u32 len)
{
	fill_pkt(op, flags, payload, len);
	return send_raw(HDR + len);
}

static void ack_events(void)
{
	u32 len;
	u64 tok;
	while (virtq_get_used(evq(), &len, &tok) == VIRTQ_DONE) {
		u32 id;
		memcpy(&id, ev_buf[tok], 4);
		if (len >= 4 && id == EVENT_TRANSPORT_RESET) {
			tg_printf("vsock: transport reset\n");
			vs.open = 0;
		}
		struct virtq_buf b = { (u64)ev_buf[tok], sizeof(ev_buf[tok]), VIRTQ_DESC_F_WRITE };
		virtq_add(evq(), &b, 1, tok);
		virtq_kick(evq());
	}
	virtio_ack_interrupt(vs.d->base);
}

/*
 * Polls for the next received packet until the deadline; copies its header to *h and
 * payload (NUL-terminated, truncated) to data. Returns the payload length or -1.
 */
static int recv_pkt(struct hdr *h, char *data, u32 cap, u64 deadline)
{
	for (;;) {
		u32 len;
		u64 tok;
		ack_events();
		int r = virtq_get_used(rxq(), &len, &tok);
		if (r == VIRTQ_DONE && tok >= RX_BUFS) {
			vs.rx_dropped++; /* the hostile mode's tiny buffer */
			continue;
		}
		if (r == VIRTQ_DONE) {
			u8 *buf = rx_bufs[tok];
			if (len < HDR) {
				vs.rx_dropped++;
				virtq_post(rxq(), vs.rx_head[tok]);
				virtq_kick(rxq());
				continue;
			}
			memcpy(h, buf, HDR);
			u32 n = h->len;
			if (n > len - HDR)
				n = len - HDR;
			u32 keep = n < cap - 1 ? n : cap - 1;
			if (data) {
				memcpy(data, buf + HDR, keep);
				data[keep] = 0;
			}
			virtq_post(rxq(), vs.rx_head[tok]);
			virtq_kick(rxq());
			if (h->op == OP_RST)
				vs.rsts++;
			return (int)n;
		}
		if (r != VIRTQ_NONE)
			return -1;
		if (tsc_passed(deadline))
			return -1;
		cpu_relax();
	}
}

static void print_text(const char *what, const char *s)
{
	tg_printf("vsock: %s ", what);
	for (; *s; s++)
		serial_putc(*s >= 0x20 && *s < 0x7f ? *s : '.');
	tg_printf("\n");
}

/* Serves host connections to `port`: accept, echo, close. */
static void do_listen(u32 port, u64 count)
{
	static char data[BUF_BYTES] NOINIT;
	struct hdr h;
	u64 served = 0;
	u64 deadline = tsc_deadline_us(vs.timeout_us);

	vs.open = 0;
	while (count == 0 || served < count) {
		int n = recv_pkt(&h, data, sizeof(data), deadline);
		if (n < 0)
			break;
		deadline = tsc_deadline_us(vs.timeout_us);
		if (h.dst_cid != vs.cid)
			continue;
		if (h.op == OP_REQUEST && (h.dst_port != port || vs.open)) {
			/* Nobody listens there (or we are busy): refuse, as a socket layer would. */
			u32 lp = vs.local_port, pp = vs.peer_port;
			vs.local_port = h.dst_port;
			vs.peer_port = h.src_port;
			send_pkt(OP_RST, 0, NULL, 0);
			vs.local_port = lp;
			vs.peer_port = pp;
			tg_printf("vsock: refused request for port=%u\n", h.dst_port);
			continue;
		}
		if (h.dst_port != port)
			continue;
		if (h.op == OP_REQUEST) {
			vs.open = 1;
			vs.local_port = port;
			vs.peer_port = h.src_port;
			vs.fwd_cnt = 0;
			send_pkt(OP_RESPONSE, 0, NULL, 0);
			tg_printf("vsock: accepted port=%u peer=%u\n", port, h.src_port);
			continue;
		}
		if (!vs.open || h.src_port != vs.peer_port)
			continue;
		if (h.op == OP_RW) {
			vs.fwd_cnt += (u32)n;
			send_pkt(OP_RW, 0, data, (u32)n);
			tg_printf("vsock: echoed %d bytes\n", n);
		} else if (h.op == OP_SHUTDOWN) {
			send_pkt(OP_RST, 0, NULL, 0);
			tg_printf("vsock: peer closed\n");
			vs.open = 0;
			served++;
		} else if (h.op == OP_RST) {
			tg_printf("vsock: reset\n");
			vs.open = 0;
			served++;
		}
	}
}

/* Connects to the host's `port`; 1 when connected, 0 when refused, -1 on timeout. */
static int connect_to(u32 port, u32 src_port)
{
	struct hdr h;
	u64 deadline = tsc_deadline_us(vs.timeout_us);

	vs.local_port = src_port;
	vs.peer_port = port;
	vs.fwd_cnt = 0;
	if (send_pkt(OP_REQUEST, 0, NULL, 0) != 0)
		return -1;
	for (;;) {
		if (recv_pkt(&h, NULL, 0, deadline) < 0)
			return -1;
		if (h.dst_port != src_port || h.src_port != port)
			continue;
		if (h.op == OP_RESPONSE) {
			tg_printf("vsock: connected port=%u\n", port);
			return 1;
		}
		if (h.op == OP_RST) {
			tg_printf("vsock: refused port=%u\n", port);
			return 0;
		}
	}
}

static void do_connect(u32 port)
{
	static char data[BUF_BYTES] NOINIT;
	static const char msg[] = "hello from guest\n";
	struct hdr h;

	if (connect_to(port, 1234) != 1)
		return;
	send_pkt(OP_RW, 0, msg, sizeof(msg) - 1);
	u64 deadline = tsc_deadline_us(vs.timeout_us);
	for (;;) {
		int n = recv_pkt(&h, data, sizeof(data), deadline);
		if (n < 0) {
			tg_printf("vsock: error receive-timeout\n");
			return;
		}
		if (h.op == OP_RW && n > 0) {
			vs.fwd_cnt += (u32)n;
			print_text("received", data);
			break;
		}
		if (h.op == OP_RST) {
			tg_printf("vsock: reset\n");
			return;
		}
	}
	send_pkt(OP_SHUTDOWN, 3, NULL, 0);
	while (recv_pkt(&h, NULL, 0, deadline) >= 0)
		if (h.op == OP_RST)
			break;
	tg_printf("vsock: closed\n");
}

/* Malformed packets of every kind; the device must drop or reset and go on serving. */
static void do_hostile(u32 port)
{
	struct hdr h;

	/* A receive buffer too small for a header comes back empty. */
	{
		static u8 tiny[16] __attribute__((aligned(16)));
		struct virtq_buf b = { (u64)tiny, sizeof(tiny), VIRTQ_DESC_F_WRITE };
		virtq_add(rxq(), &b, 1, RX_BUFS); /* token past the real buffers */
		virtq_kick(rxq());
	}
	vs.local_port = 4000;
	vs.peer_port = port;
	vs.fwd_cnt = 0;
	/* Wrong source CID, wrong destination CID: dropped. */
	fill_pkt(OP_REQUEST, 0, NULL, 0);
	tx_hdr()->src_cid = vs.cid + 1;
	send_raw(HDR);
	fill_pkt(OP_REQUEST, 0, NULL, 0);
	tx_hdr()->dst_cid = 77;
	send_raw(HDR);
	/* Unsupported type, unknown op: each answered with a RST. */
	fill_pkt(OP_REQUEST, 0, NULL, 0);
	tx_hdr()->type = 2;
	send_raw(HDR);
	fill_pkt(OP_REQUEST, 0, NULL, 0);
	tx_hdr()->op = 99;
	send_raw(HDR);
	/* A length beyond the descriptor, one beyond any limit, a short header: dropped. */
	fill_pkt(OP_RW, 0, NULL, 0);
	tx_hdr()->len = 1000;
	send_raw(HDR);
	fill_pkt(OP_RW, 0, NULL, 0);
	tx_hdr()->len = 0xffffffff;
	send_raw(BUF_BYTES);
	send_raw(10);
	/* Zero-length and device-writable buffers in the transmit queue: dropped. */
	{
		u32 len;
		struct virtq_buf zero = { (u64)tx_buf, 0, 0 };
		struct virtq_buf wr = { (u64)tx_buf, BUF_BYTES, VIRTQ_DESC_F_WRITE };
		virtq_add(txq(), &zero, 1, 0);
		virtq_add(txq(), &wr, 1, 0);
		virtq_kick(txq());
		virtq_wait_used(txq(), vs.timeout_us, &len, NULL);
		virtq_wait_used(txq(), vs.timeout_us, &len, NULL);
	}
	/* A descriptor loop: two descriptors naming each other. */
	{
		u32 len;
		struct virtq_desc loop[2] = {
			{ (u64)tx_buf, HDR, VIRTQ_DESC_F_NEXT, 1 },
			{ (u64)tx_buf, HDR, VIRTQ_DESC_F_NEXT, 0 },
		};
		fill_pkt(OP_REQUEST, 0, NULL, 0);
		if (virtq_add_raw(txq(), loop, 2, 0) >= 0) {
			virtq_kick(txq());
			if (virtq_wait_used(txq(), vs.timeout_us, &len, NULL) != VIRTQ_DONE)
				tg_printf("vsock: error loop-not-returned\n");
		}
	}
	/* Collect the answers: two RSTs (type, op), maybe one for the loop's REQUEST. */
	u64 deadline = tsc_deadline_us(200000);
	while (recv_pkt(&h, NULL, 0, deadline) >= 0)
		;
	tg_printf("vsock: hostile resets=%u\n", vs.rsts);

	/* Credit overrun: ignore the host's buf_alloc on a stream nobody reads. */
	if (connect_to(port + 1, 4001) == 1) {
		u64 sent = 0;
		int reset = 0;
		for (u32 i = 0; i < 4096 && !reset; i++) {
			send_pkt(OP_RW, 0, rx_bufs[0], BUF_BYTES - HDR);
			sent += BUF_BYTES - HDR;
			while (recv_pkt(&h, NULL, 0, tsc_deadline_us(0)) >= 0)
				if (h.op == OP_RST && h.dst_port == 4001)
					reset = 1;
		}
		if (reset)
			tg_printf("vsock: overrun reset after %lu bytes\n", sent);
		else
			tg_printf("vsock: overrun no reset\n");
	}
}

void virtio_vsock_run(const struct tg_opts *o)
{
	for (u32 slot = 0; slot < virtio_count(); slot++) {
		struct virtio_dev *d = virtio_get(slot);
		if (!d->usable || d->device_id != VIRTIO_ID_VSOCK)
			continue;
		vs.timeout_us = o->vsock_timeout_ms * 1000;
		vs.rsts = 0;
		vs.rx_dropped = 0;
		vs.open = 0;
		if (setup(d) != 0) {
			tg_printf("vsock: error setup\n");
			return;
		}
		tg_printf("vsock: cid=%lu\n", vs.cid);
		u32 port = (u32)o->vsock_port;
		switch (o->vsock) {
		case VSOCK_LISTEN:
			do_listen(port, o->vsock_count);
			break;
		case VSOCK_CONNECT:
			do_connect(port);
			break;
		case VSOCK_HOSTILE:
			do_hostile(port);
			do_listen(port, o->vsock_count);
			break;
		default:
			break;
		}
		tg_printf("vsock: done rx_dropped=%u\n", vs.rx_dropped);
		return;
	}
	tg_printf("vsock: none\n");
}
