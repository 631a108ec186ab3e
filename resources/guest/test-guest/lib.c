/* Minimal string and formatting helpers. */
#include "tg.h"

#ifdef __x86_64__
/*
 * memset/memcpy use a single rep stosb/movsb: cheap natively, and under KVM's
 * instruction emulator (PVM hosts) far cheaper than a loop of separate instructions.
 */
void *memset(void *dst, int c, size_t n)
{
	void *d = dst;
	__asm__ volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
	return dst;
}

void *memcpy(void *dst, const void *src, size_t n)
{
	void *d = dst;
	__asm__ volatile("rep movsb" : "+D"(d), "+S"(src), "+c"(n) : : "memory");
	return dst;
}
#else
void *memset(void *dst, int c, size_t n)
{
	u8 *d = dst;
	while (n--)
		*d++ = (u8)c;
	return dst;
}

void *memcpy(void *dst, const void *src, size_t n)
{
	u8 *d = dst;
	const u8 *s = src;
	while (n--)
		*d++ = *s++;
	return dst;
}
#endif

void *memmove(void *dst, const void *src, size_t n)
{
	u8 *d = dst;
	const u8 *s = src;
	if (d <= s || d >= s + n) {
		memcpy(d, s, n);
	} else {
		while (n--)
			d[n] = s[n];
	}
	return dst;
}

int memcmp(const void *a, const void *b, size_t n)
{
	const u8 *x = a, *y = b;
	for (; n; n--, x++, y++)
		if (*x != *y)
			return *x < *y ? -1 : 1;
	return 0;
}

/* First c in s[0..n), or NULL; on x86_64 one repne scasb. */
void *memchr(const void *s, int c, size_t n)
{
#ifndef __x86_64__
	for (const u8 *p = s; n; n--, p++)
		if (*p == (u8)c)
			return (void *)p;
	return NULL;
#else
	const u8 *d = s;
	u8 found;

	if (n == 0)
		return NULL;
	__asm__ volatile("repne scasb; sete %2"
			 : "+D"(d), "+c"(n), "=qm"(found)
			 : "a"((u8)c), "m"(*(const u8(*)[n])s)
			 : "cc");
	return found ? (void *)(d - 1) : NULL;
#endif
}

size_t strnlen(const char *s, size_t max)
{
	const char *end = memchr(s, 0, max);
	return end ? (size_t)(end - s) : max;
}

size_t strlen(const char *s)
{
	return strnlen(s, ~0UL >> 1);
}

/* Decimal, or hexadecimal with a 0x prefix. Returns 0 on success. */
int parse_u64(const char *s, size_t len, u64 *out)
{
	u64 v = 0;
	size_t i = 0;
	unsigned base = 10;

	if (len >= 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
		base = 16;
		i = 2;
	}
	if (i == len)
		return -1;
	for (; i < len; i++) {
		char c = s[i];
		unsigned d;
		if (c >= '0' && c <= '9')
			d = (unsigned)(c - '0');
		else if (base == 16 && c >= 'a' && c <= 'f')
			d = (unsigned)(c - 'a' + 10);
		else if (base == 16 && c >= 'A' && c <= 'F')
			d = (unsigned)(c - 'A' + 10);
		else
			return -1;
		if (v > (~0UL - d) / base)
			return -1; /* overflow */
		v = v * base + d;
	}
	*out = v;
	return 0;
}

static void put_num(u64 v, unsigned base, int neg, unsigned width, char pad)
{
	char buf[24];
	unsigned n = 0;

	do {
		unsigned d = (unsigned)(v % base);
		buf[n++] = (char)(d < 10 ? '0' + d : 'a' + d - 10);
		v /= base;
	} while (v);
	if (neg)
		buf[n++] = '-';
	while (width > n) {
		serial_putc(pad);
		width--;
	}
	while (n)
		serial_putc(buf[--n]);
}

/* printf subset: %[0][width][l]{d,u,x,s,c} and %%. Lines end in a bare '\n'. */
void tg_vprintf(const char *fmt, va_list ap)
{
	for (; *fmt; fmt++) {
		if (*fmt != '%') {
			serial_putc(*fmt);
			continue;
		}
		fmt++;
		char pad = ' ';
		unsigned width = 0;
		int lng = 0;
		if (*fmt == '0') {
			pad = '0';
			fmt++;
		}
		while (*fmt >= '0' && *fmt <= '9')
			width = width * 10 + (unsigned)(*fmt++ - '0');
		while (*fmt == 'l') {
			lng = 1;
			fmt++;
		}
		switch (*fmt) {
		case 'd': {
			i64 v = lng ? va_arg(ap, i64) : va_arg(ap, int);
			put_num(v < 0 ? (u64)-v : (u64)v, 10, v < 0, width, pad);
			break;
		}
		case 'u':
			put_num(lng ? va_arg(ap, u64) : va_arg(ap, u32), 10, 0, width, pad);
			break;
		case 'x':
			put_num(lng ? va_arg(ap, u64) : va_arg(ap, u32), 16, 0, width, pad);
			break;
		case 'c':
			serial_putc((char)va_arg(ap, int));
			break;
		case 's': {
			const char *s = va_arg(ap, const char *);
			serial_write(s, strlen(s));
			break;
		}
		case '%':
			serial_putc('%');
			break;
		case '\0':
			return;
		default:
			serial_putc('%');
			serial_putc(*fmt);
			break;
		}
	}
}

void tg_printf(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	tg_vprintf(fmt, ap);
	va_end(ap);
}

int tg_quiet;

void tg_info(const char *fmt, ...)
{
	va_list ap;

	if (tg_quiet)
		return;
	va_start(ap, fmt);
	tg_vprintf(fmt, ap);
	va_end(ap);
}
