/* Common definitions for the freestanding test guests (x86_64, and the virtio drivers on arm64). */
#ifndef TG_H
#define TG_H

#include <stdarg.h>

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef long i64;
typedef unsigned long size_t;

#define NULL ((void *)0)
#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))

/*
 * Not zeroed at start-up (linker.ld): for state that is set before use. .bss is
 * cleared before the boot-timer write, so large objects there delay that write.
 */
#define NOINIT __attribute__((section(".noinit")))

/*
 * What differs between the architectures: MMIO and port accessors, the barriers, the cycle
 * counter, the UART's registers, which physical addresses are mapped. The arm64 test guest
 * (resources/guest/test-guest-arm64) builds the virtio drivers and helpers of this directory
 * with its own arch_arm64.h.
 */
#if defined(__aarch64__)
#include "arch_arm64.h"
#elif defined(__x86_64__)
#include "arch_x86.h"
#else
#error "the test guest is built for x86_64 or aarch64"
#endif

/* ---- lib.c ---- */
void *memset(void *dst, int c, size_t n);
void *memcpy(void *dst, const void *src, size_t n);
void *memmove(void *dst, const void *src, size_t n);
int memcmp(const void *a, const void *b, size_t n);
void *memchr(const void *s, int c, size_t n);
size_t strnlen(const char *s, size_t max);
size_t strlen(const char *s);
int parse_u64(const char *s, size_t len, u64 *out);
void tg_vprintf(const char *fmt, va_list ap);
void tg_printf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Informational lines, left out with tg.quiet=1. */
extern int tg_quiet;
void tg_info(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* ---- serial.c ---- */
void serial_init(void);
void serial_putc(char c);
void serial_write(const char *s, size_t n);
int serial_try_getc(void);
u8 serial_getc(void);

#ifdef __x86_64__
/* ---- bootinfo.c (x86_64) ---- */
#define MAX_MEMMAP 128
#define MAX_CMDLINE 4096
#define MAX_RESERVED 8

struct mem_entry {
	u64 addr;
	u64 size;
	u32 type;
};

struct phys_range {
	u64 start;
	u64 end; /* exclusive */
};

struct bootinfo {
	u32 protocol; /* PROTO_LINUX64 or PROTO_PVH */
	const char *protocol_name;
	int valid;    /* boot structure present and recognised */
	u64 info_addr;
	char cmdline[MAX_CMDLINE];
	u32 cmdline_len;
	u32 nr_mem;
	struct mem_entry mem[MAX_MEMMAP];
	/* Guest-physical ranges the VMM handed over (boot structure, command line, memory map). */
	u32 nr_reserved;
	struct phys_range reserved[MAX_RESERVED];
};

const char *bootinfo_early_cmdline(u32 protocol, u64 info, u32 *len);
void bootinfo_parse(u32 protocol, u64 info, struct bootinfo *bi);
void bootinfo_add_reserved(struct bootinfo *bi, u64 start, u64 len);
#endif

/* ---- cmdline.c ---- */
/* EXIT_POWEROFF (tg.exit=poweroff) only on arm64 (PSCI SYSTEM_OFF). */
enum exit_mode { EXIT_REBOOT, EXIT_HALT, EXIT_FAULT, EXIT_POWEROFF };
enum blk_mode { BLK_OFF, BLK_CHECK, BLK_READ, BLK_WRITE, BLK_BENCH, BLK_HOSTILE };
enum net_mode { NET_OFF, NET_INFO, NET_PING, NET_SERVE, NET_BENCH };
enum vsock_mode { VSOCK_OFF, VSOCK_LISTEN, VSOCK_CONNECT, VSOCK_HOSTILE };

/* Most virtio_mmio.device= entries kept from the command line. */
#define MAX_VIRTIO_SLOTS 16

/* One "virtio_mmio.device=<size>@<base>:<irq>[:<id>]" entry. */
struct virtio_slot {
	u64 base;
	u64 size;
	u32 irq;
};

struct tg_opts {
	int timer;          /* tg.timer: write the boot-timer byte (default 1) */
	int smp;            /* tg.smp: start the APs (default 1) */
	u64 smp_timeout_ms; /* tg.smp_timeout_ms: how long to wait for the APs */
	u64 count;          /* tg.count */
	u64 delay_ms;       /* tg.delay_ms */
	int echo;           /* tg.echo */
	int quiet;          /* tg.quiet: only the count, echo and final lines */
	enum exit_mode exit_mode; /* tg.exit */
	int virtio;         /* tg.virtio: print every announced virtio-mmio device */
	enum blk_mode blk;  /* tg.blk */
	u64 blk_seed;       /* tg.blk_seed: data pattern seed (default 1) */
	u64 blk_sector;     /* tg.blk_sector: first sector of check/read/write (default 0) */
	u64 blk_count;      /* tg.blk_count: sectors of check/read/write (default 8) */
	u64 blk_ops;        /* tg.blk_ops: random 4 KiB reads of the benchmark (default 2000) */
	u64 blk_mib;        /* tg.blk_mib: MiB of the sequential benchmark (default 16) */
	u64 blk_dev;        /* tg.blk_dev: block device for bench and hostile (default 0) */
	int blk_late;       /* tg.blk_late=1: run the tg.blk mode after counting, not before */
	int kbd;            /* tg.kbd=1: wait for Ctrl+Alt+Del from the i8042 before finishing */
	u64 blk_timeout_ms; /* tg.blk_timeout_ms: longest wait for one request (default 5000) */
	enum net_mode net;  /* tg.net */
	u64 net_dev;        /* tg.net_dev: network device for ping, serve and bench (default 0) */
	int net_late;       /* tg.net_late=1: run the tg.net mode after counting, not before */
	int net_split;      /* tg.net_split=1: header and frame in separate descriptors */
	u32 net_ip;         /* tg.ip: the guest's IPv4 address (default 10.0.2.2) */
	u32 net_peer;       /* tg.peer: the host's IPv4 address (default 10.0.2.1) */
	u64 ping_count;     /* tg.ping_count: echo requests of tg.net=ping (default 3) */
	u64 net_timeout_ms; /* tg.net_timeout_ms: longest wait for a reply or a frame (default 2000) */
	u64 serve_ms;       /* tg.serve_ms: how long tg.net=serve answers, 0 = forever (default 5000) */
	u64 net_frames;     /* tg.net_frames: datagrams of the transmit benchmark (default 20000) */
	u64 net_size;       /* tg.net_size: UDP payload bytes of the benchmark (default 1400) */
	u64 net_port;       /* tg.net_port: the peer's UDP port for the benchmark (default 9) */
	u64 net_rx_frames;  /* tg.net_rx_frames: datagrams of the receive benchmark (default 0) */
	u64 rng;            /* tg.rng: bytes to ask the entropy device for, twice (0 = off) */
	enum vsock_mode vsock; /* tg.vsock */
	u64 vsock_port;     /* tg.vsock_port: port to listen on or connect to (default 52) */
	u64 vsock_count;    /* tg.vsock_count: connections to serve, 0 = until idle (default 1) */
	u64 vsock_timeout_ms; /* tg.vsock_timeout_ms: longest wait for a packet (default 10000) */
	u64 balloon;        /* tg.balloon: MiB to touch and balloon (0 = off) */
	int balloon_hostile; /* tg.balloon_hostile=1: malformed balloon requests first */
	u64 balloon_timeout_ms; /* tg.balloon_timeout_ms: longest wait for a target (default 60000) */
	u32 nr_virtio;      /* virtio_mmio.device= entries, in command-line order */
	struct virtio_slot virtio_slots[MAX_VIRTIO_SLOTS];
};

void opts_parse(const char *cmdline, u32 len, struct tg_opts *o);
int opts_timer_disabled(const char *cmdline, u32 len);

/*
 * ---- delay.c (x86_64: the TSC), timer.c (arm64: the generic timer's virtual counter, which
 * rdtsc() reads there) ----
 */
#ifdef __x86_64__
int is_hypervisor(void);
u64 tsc_khz(void);
const char *tsc_source(void);
#endif
/* One line with the counter's frequency and where it came from, before the first benchmark. */
void tsc_report(void);
u64 tsc_deadline_us(u64 us);
int tsc_passed(u64 deadline);
u64 tsc_cycles_to_us(u64 cycles);
void delay_us(u64 us);
void delay_ms(u64 ms);

#ifdef __x86_64__
/* ---- smp.c (x86_64) ---- */
struct mp_info {
	int found;
	u64 fp_addr;  /* floating pointer structure */
	u64 cfg_addr; /* "PCMP" configuration table */
	u32 cfg_len;
	u32 ncpus;    /* enabled processor entries */
	u8 apic_ids[MAX_CPUS];
};

void mptable_find(struct mp_info *mp);
void mptable_print(const struct mp_info *mp);
void smp_boot(struct bootinfo *bi, const struct mp_info *mp, const struct tg_opts *o);
#endif

/* ---- modes.c ---- */
/* usable: bytes of usable RAM (the balloon's). */
void tg_devices(const struct tg_opts *o, u64 usable);
void tg_devices_late(const struct tg_opts *o);
void tg_count(const struct tg_opts *o);
void tg_echo(void);

/* ---- virtio_mmio.c, virtio_blk.c, virtio_net.c ---- */
void virtio_probe_all(const struct tg_opts *o);
void virtio_blk_run(const struct tg_opts *o);
void virtio_net_run(const struct tg_opts *o);
void virtio_rng_run(const struct tg_opts *o);
void virtio_vsock_run(const struct tg_opts *o);
/* usable: bytes of usable RAM in the memory map. */
void virtio_balloon_run(const struct tg_opts *o, u64 usable);

#ifdef __x86_64__
/* ---- main.c (x86_64) ---- */
void tg_main(u32 protocol, u64 info);
void __attribute__((noreturn)) triple_fault(void);
#endif

#endif
