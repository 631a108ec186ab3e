/*
 * The guest's "tg." command-line keys and the "virtio_mmio.device=" entries. Unknown
 * keys and other words are ignored.
 */
#include "tg.h"

static int is_space(char c)
{
	return c == ' ' || c == '\t' || c == '\n';
}

static int key_is(const char *tok, size_t klen, const char *key)
{
	size_t n = strlen(key);
	return klen == n && memcmp(tok, key, n) == 0;
}

static int val_is(const char *val, size_t vlen, const char *s)
{
	size_t n = strlen(s);
	return vlen == n && memcmp(val, s, n) == 0;
}

static void set_bool(const char *val, size_t vlen, int *out)
{
	u64 v;
	if (parse_u64(val, vlen, &v) == 0)
		*out = v != 0;
}

static void set_u64(const char *val, size_t vlen, u64 *out)
{
	u64 v;
	if (parse_u64(val, vlen, &v) == 0)
		*out = v;
}

/*
 * Leading number of s[*pos..len): decimal, or hex with 0x, plus an optional K/M/G
 * suffix when with_suffix is set (Linux memparse()). Returns 0 on success.
 */
static int scan_num(const char *s, size_t len, size_t *pos, int with_suffix, u64 *out)
{
	size_t i = *pos, start = i;
	int hex = len - i >= 2 && s[i] == '0' && (s[i + 1] == 'x' || s[i + 1] == 'X');

	if (hex)
		i += 2;
	while (i < len && ((s[i] >= '0' && s[i] <= '9') ||
			   (hex && ((s[i] >= 'a' && s[i] <= 'f') || (s[i] >= 'A' && s[i] <= 'F')))))
		i++;
	if (parse_u64(s + start, i - start, out) != 0)
		return -1;
	if (with_suffix && i < len) {
		unsigned shift = 0;
		switch (s[i]) {
		case 'k': case 'K': shift = 10; break;
		case 'm': case 'M': shift = 20; break;
		case 'g': case 'G': shift = 30; break;
		}
		if (shift) {
			if (*out > (~0UL >> shift))
				return -1;
			*out <<= shift;
			i++;
		}
	}
	*pos = i;
	return 0;
}

/*
 * "virtio_mmio.device=<size>@<base>:<irq>[:<id>]", as Linux's virtio_mmio driver reads
 * it: size and base take K/M/G suffixes (4K, 0x1000, 4096, 512 all work), the optional
 * platform device id is ignored. Each valid entry is a new slot, in command-line order.
 */
static void add_virtio_slot(const char *val, size_t vlen, struct tg_opts *o)
{
	struct virtio_slot sl;
	size_t i = 0;
	u64 irq, id;

	if (o->nr_virtio >= MAX_VIRTIO_SLOTS)
		return;
	if (scan_num(val, vlen, &i, 1, &sl.size) || sl.size == 0 || i >= vlen || val[i++] != '@')
		return;
	if (scan_num(val, vlen, &i, 1, &sl.base) || i >= vlen || val[i++] != ':')
		return;
	if (scan_num(val, vlen, &i, 0, &irq) || irq > 0xffffffffUL)
		return;
	if (i < vlen && (val[i++] != ':' || scan_num(val, vlen, &i, 0, &id)))
		return;
	if (i != vlen)
		return;
	sl.irq = (u32)irq;
	o->virtio_slots[o->nr_virtio++] = sl;
}

/* "A.B.C.D", each part decimal 0-255; host byte order. Left unchanged if malformed. */
static void set_ip(const char *val, size_t vlen, u32 *out)
{
	u32 ip = 0;
	size_t i = 0;

	for (int part = 0; part < 4; part++) {
		size_t start = i;
		u64 v;
		while (i < vlen && val[i] >= '0' && val[i] <= '9')
			i++;
		if (i == start || i - start > 3 || parse_u64(val + start, i - start, &v) || v > 255)
			return;
		ip = ip << 8 | (u32)v;
		if (part < 3 && (i >= vlen || val[i++] != '.'))
			return;
	}
	if (i == vlen)
		*out = ip;
}

static void apply(const char *tok, size_t len, struct tg_opts *o)
{
	size_t klen = 0;
	while (klen < len && tok[klen] != '=')
		klen++;
	if (klen == len)
		return; /* no '=' */
	const char *val = tok + klen + 1;
	size_t vlen = len - klen - 1;

	if (key_is(tok, klen, "tg.timer"))
		set_bool(val, vlen, &o->timer);
	else if (key_is(tok, klen, "tg.smp"))
		set_bool(val, vlen, &o->smp);
	else if (key_is(tok, klen, "tg.smp_timeout_ms"))
		set_u64(val, vlen, &o->smp_timeout_ms);
	else if (key_is(tok, klen, "tg.count"))
		set_u64(val, vlen, &o->count);
	else if (key_is(tok, klen, "tg.delay_ms"))
		set_u64(val, vlen, &o->delay_ms);
	else if (key_is(tok, klen, "tg.echo"))
		set_bool(val, vlen, &o->echo);
	else if (key_is(tok, klen, "tg.quiet"))
		set_bool(val, vlen, &o->quiet);
	else if (key_is(tok, klen, "tg.exit")) {
		if (val_is(val, vlen, "reboot"))
			o->exit_mode = EXIT_REBOOT;
		else if (val_is(val, vlen, "halt"))
			o->exit_mode = EXIT_HALT;
		else if (val_is(val, vlen, "fault"))
			o->exit_mode = EXIT_FAULT;
#ifdef __aarch64__
		else if (val_is(val, vlen, "poweroff"))
			o->exit_mode = EXIT_POWEROFF;
#endif
	} else if (key_is(tok, klen, "tg.virtio"))
		set_bool(val, vlen, &o->virtio);
	else if (key_is(tok, klen, "tg.blk")) {
		static const struct {
			const char *name;
			enum blk_mode mode;
		} modes[] = {
			{ "off", BLK_OFF }, { "check", BLK_CHECK }, { "read", BLK_READ },
			{ "write", BLK_WRITE }, { "bench", BLK_BENCH }, { "hostile", BLK_HOSTILE },
		};
		for (size_t i = 0; i < ARRAY_SIZE(modes); i++)
			if (val_is(val, vlen, modes[i].name))
				o->blk = modes[i].mode;
	} else if (key_is(tok, klen, "tg.blk_seed"))
		set_u64(val, vlen, &o->blk_seed);
	else if (key_is(tok, klen, "tg.blk_sector"))
		set_u64(val, vlen, &o->blk_sector);
	else if (key_is(tok, klen, "tg.blk_count"))
		set_u64(val, vlen, &o->blk_count);
	else if (key_is(tok, klen, "tg.blk_ops"))
		set_u64(val, vlen, &o->blk_ops);
	else if (key_is(tok, klen, "tg.blk_mib"))
		set_u64(val, vlen, &o->blk_mib);
	else if (key_is(tok, klen, "tg.blk_dev"))
		set_u64(val, vlen, &o->blk_dev);
	else if (key_is(tok, klen, "tg.rng"))
		set_u64(val, vlen, &o->rng);
	else if (key_is(tok, klen, "tg.vsock")) {
		static const struct {
			const char *name;
			enum vsock_mode mode;
		} modes[] = {
			{ "off", VSOCK_OFF }, { "listen", VSOCK_LISTEN }, { "connect", VSOCK_CONNECT },
			{ "hostile", VSOCK_HOSTILE },
		};
		for (size_t i = 0; i < ARRAY_SIZE(modes); i++)
			if (val_is(val, vlen, modes[i].name))
				o->vsock = modes[i].mode;
	} else if (key_is(tok, klen, "tg.vsock_port"))
		set_u64(val, vlen, &o->vsock_port);
	else if (key_is(tok, klen, "tg.vsock_count"))
		set_u64(val, vlen, &o->vsock_count);
	else if (key_is(tok, klen, "tg.vsock_timeout_ms"))
		set_u64(val, vlen, &o->vsock_timeout_ms);
	else if (key_is(tok, klen, "tg.balloon"))
		set_u64(val, vlen, &o->balloon);
	else if (key_is(tok, klen, "tg.balloon_hostile"))
		set_bool(val, vlen, &o->balloon_hostile);
	else if (key_is(tok, klen, "tg.balloon_timeout_ms"))
		set_u64(val, vlen, &o->balloon_timeout_ms);
	else if (key_is(tok, klen, "tg.kbd"))
		set_bool(val, vlen, &o->kbd);
	else if (key_is(tok, klen, "tg.blk_late"))
		set_bool(val, vlen, &o->blk_late);
	else if (key_is(tok, klen, "tg.blk_timeout_ms"))
		set_u64(val, vlen, &o->blk_timeout_ms);
	else if (key_is(tok, klen, "tg.net")) {
		static const struct {
			const char *name;
			enum net_mode mode;
		} modes[] = {
			{ "off", NET_OFF }, { "info", NET_INFO }, { "ping", NET_PING },
			{ "serve", NET_SERVE }, { "bench", NET_BENCH },
		};
		for (size_t i = 0; i < ARRAY_SIZE(modes); i++)
			if (val_is(val, vlen, modes[i].name))
				o->net = modes[i].mode;
	} else if (key_is(tok, klen, "tg.net_dev"))
		set_u64(val, vlen, &o->net_dev);
	else if (key_is(tok, klen, "tg.net_late"))
		set_bool(val, vlen, &o->net_late);
	else if (key_is(tok, klen, "tg.net_split"))
		set_bool(val, vlen, &o->net_split);
	else if (key_is(tok, klen, "tg.ip"))
		set_ip(val, vlen, &o->net_ip);
	else if (key_is(tok, klen, "tg.peer"))
		set_ip(val, vlen, &o->net_peer);
	else if (key_is(tok, klen, "tg.ping_count"))
		set_u64(val, vlen, &o->ping_count);
	else if (key_is(tok, klen, "tg.net_timeout_ms"))
		set_u64(val, vlen, &o->net_timeout_ms);
	else if (key_is(tok, klen, "tg.serve_ms"))
		set_u64(val, vlen, &o->serve_ms);
	else if (key_is(tok, klen, "tg.net_frames"))
		set_u64(val, vlen, &o->net_frames);
	else if (key_is(tok, klen, "tg.net_size"))
		set_u64(val, vlen, &o->net_size);
	else if (key_is(tok, klen, "tg.net_port")) {
		u64 port = o->net_port;
		set_u64(val, vlen, &port);
		if (port <= 0xffff)
			o->net_port = port;
	} else if (key_is(tok, klen, "tg.net_rx_frames"))
		set_u64(val, vlen, &o->net_rx_frames);
	else if (key_is(tok, klen, "virtio_mmio.device"))
		add_virtio_slot(val, vlen, o);
}

void opts_parse(const char *cmdline, u32 len, struct tg_opts *o)
{
	o->timer = 1;
	o->smp = 1;
	o->smp_timeout_ms = 1000;
	o->count = 0;
	o->delay_ms = 0;
	o->echo = 0;
	o->quiet = 0;
	o->exit_mode = EXIT_REBOOT;
	o->virtio = 0;
	o->blk = BLK_OFF;
	o->blk_seed = 1;
	o->blk_sector = 0;
	o->blk_count = 8;
	o->blk_ops = 2000;
	o->blk_mib = 16;
	o->blk_dev = 0;
	o->blk_late = 0;
	o->kbd = 0;
	o->blk_timeout_ms = 5000;
	o->net = NET_OFF;
	o->net_dev = 0;
	o->net_late = 0;
	o->net_split = 0;
	o->net_ip = 0x0a000202;   /* 10.0.2.2 */
	o->net_peer = 0x0a000201; /* 10.0.2.1 */
	o->ping_count = 3;
	o->net_timeout_ms = 2000;
	o->serve_ms = 5000;
	o->net_frames = 20000;
	o->net_size = 1400;
	o->net_port = 9;
	o->net_rx_frames = 0;
	o->rng = 0;
	o->vsock = VSOCK_OFF;
	o->vsock_port = 52;
	o->vsock_count = 1;
	o->vsock_timeout_ms = 10000;
	o->balloon = 0;
	o->balloon_hostile = 0;
	o->balloon_timeout_ms = 60000;
	o->nr_virtio = 0; /* virtio_slots[] is written up to nr_virtio */

	u32 i = 0;
	while (i < len) {
		while (i < len && is_space(cmdline[i]))
			i++;
		u32 start = i;
		while (i < len && !is_space(cmdline[i]))
			i++;
		if (i > start)
			apply(cmdline + start, i - start, o);
	}
}

/*
 * Whether the command line turns the boot timer off (tg.timer=0), with the same
 * result as opts_parse(). It runs before the boot-timer write, so it hops from one 't'
 * to the next with memchr (a single rep scasb): every instruction counts when guest
 * code runs in an instruction emulator.
 */
int opts_timer_disabled(const char *s, u32 len)
{
	const u64 key = 0x72656d69742e6774UL; /* "tg.timer" as a little-endian u64 */
	const char *end = s + len;
	const char *p = s;
	int off = 0;

	while (end - p >= 10 && (p = memchr(p, 't', (size_t)(end - p - 9)))) {
		u64 w;
		memcpy(&w, p, 8);
		if (w != key || p[8] != '=' || (p > s && !is_space(p[-1]))) {
			p++;
			continue;
		}
		const char *val = p + 9, *v_end = val;
		while (v_end < end && !is_space(*v_end))
			v_end++;
		u64 v;
		if (parse_u64(val, (size_t)(v_end - val), &v) == 0)
			off = v == 0;
		p = v_end;
	}
	return off;
}
