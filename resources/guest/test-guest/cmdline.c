/* The guest's "tg." command-line keys. Unknown keys and other words are ignored. */
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
	}
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
