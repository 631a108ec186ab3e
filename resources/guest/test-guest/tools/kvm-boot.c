/*
 * kvm-boot: boot a test guest directly on /dev/kvm the way a Firecracker-style VMM
 * does, to check the guest without any VMM. Not a VMM: just enough devices for the
 * test guest (COM1 on 0x3f8, i8042 reset, the boot-timer byte at 0xC000_0000).
 *
 * Firecracker's x86_64 layout: GDT 0x500, IDT 0x520, PVH start_info 0x6000, zero page
 * (Linux) or PVH memory map 0x7000, boot stack 0x8ff0, page tables 0x9000-0xbfff (first
 * GiB identity-mapped with 2 MiB pages), command line 0x20000 (--cmdline-addr moves it),
 * MP table 0x9fc00, RAM
 * [0, 0x9fc00) and [1 MiB, end).
 *
 *   kvm-boot [--pvh] [--smp N] [--mem MiB] [--cmdline STR] [--cmdline-addr ADDR]
 *            [--input STR] [--timeout SEC] GUEST.elf
 *
 * Guest serial output goes to stdout; kvm-boot's own lines ("kvm-boot: ...") to stderr.
 * Exit status: 0 after an i8042 reset, 2 on a triple fault (KVM_EXIT_SHUTDOWN), 3 on
 * KVM_EXIT_INTERNAL_ERROR or another unexpected exit, 4 on timeout, 1 on setup errors.
 */
#define _GNU_SOURCE
#include <elf.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define GDT_ADDR 0x500
#define IDT_ADDR 0x520
#define PVH_INFO_ADDR 0x6000
#define ZERO_PAGE_ADDR 0x7000
#define PVH_MEMMAP_ADDR 0x7000
#define BOOT_STACK 0x8ff0
#define PML4_ADDR 0x9000
#define PDPT_ADDR 0xa000
#define PD_ADDR 0xb000
#define CMDLINE_ADDR_DEFAULT 0x20000
#define CMDLINE_MAX 2048
#define EBDA_START 0x9fc00
#define HIMEM_START 0x100000
#define BOOT_TIMER_ADDR 0xc0000000ULL
#define MAX_VCPUS 32

static uint8_t *mem;
static uint64_t mem_size;
static int vm_fd, kvm_fd;
static int nvcpus = 1;
static int pvh;
static const char *input = "";
static size_t input_pos;
static uint8_t uart_lcr;
static pthread_mutex_t io_lock = PTHREAD_MUTEX_INITIALIZER;
static struct timespec t_start;
static uint64_t cmdline_addr = CMDLINE_ADDR_DEFAULT;

static void die(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	fprintf(stderr, "kvm-boot: ");
	vfprintf(stderr, fmt, ap);
	fprintf(stderr, "\n");
	va_end(ap);
	exit(1);
}

static double elapsed_ms(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (t.tv_sec - t_start.tv_sec) * 1e3 + (t.tv_nsec - t_start.tv_nsec) / 1e6;
}

static void __attribute__((noreturn)) finish(int status, const char *fmt, ...)
{
	va_list ap;
	fflush(stdout);
	va_start(ap, fmt);
	fprintf(stderr, "kvm-boot: [%.3f ms] ", elapsed_ms());
	vfprintf(stderr, fmt, ap);
	fprintf(stderr, "\n");
	va_end(ap);
	_exit(status);
}

static void *gpa(uint64_t addr, uint64_t len)
{
	if (addr > mem_size || len > mem_size - addr)
		die("guest address 0x%llx+0x%llx outside RAM", (unsigned long long)addr,
		    (unsigned long long)len);
	return mem + addr;
}

/* ---- ELF loading: PT_LOAD segments at p_paddr ---- */

static uint64_t load_elf(const char *path, uint32_t *pvh_entry)
{
	int fd = open(path, O_RDONLY);
	struct stat st;
	if (fd < 0 || fstat(fd, &st) < 0)
		die("cannot open %s: %s", path, strerror(errno));
	uint8_t *f = mmap(NULL, st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
	if (f == MAP_FAILED)
		die("mmap %s failed", path);
	Elf64_Ehdr *eh = (Elf64_Ehdr *)f;
	if (memcmp(eh->e_ident, ELFMAG, SELFMAG) || eh->e_ident[EI_CLASS] != ELFCLASS64 ||
	    eh->e_machine != EM_X86_64)
		die("%s is not an x86_64 ELF64 file", path);
	*pvh_entry = 0;
	for (int i = 0; i < eh->e_phnum; i++) {
		Elf64_Phdr *ph = (Elf64_Phdr *)(f + eh->e_phoff + (uint64_t)i * eh->e_phentsize);
		if (ph->p_type == PT_LOAD) {
			if (ph->p_paddr < HIMEM_START)
				die("segment below 1 MiB (0x%llx)", (unsigned long long)ph->p_paddr);
			memcpy(gpa(ph->p_paddr, ph->p_memsz), f + ph->p_offset, ph->p_filesz);
			memset(gpa(ph->p_paddr + ph->p_filesz, 0), 0, ph->p_memsz - ph->p_filesz);
		} else if (ph->p_type == PT_NOTE) {
			uint64_t off = ph->p_offset, end = ph->p_offset + ph->p_filesz;
			while (off + sizeof(Elf64_Nhdr) <= end) {
				Elf64_Nhdr *nh = (Elf64_Nhdr *)(f + off);
				const char *name = (const char *)(nh + 1);
				uint64_t desc = off + sizeof(*nh) + ((nh->n_namesz + 3) & ~3u);
				if (nh->n_type == 18 && nh->n_namesz == 4 && !memcmp(name, "Xen", 4))
					memcpy(pvh_entry, f + desc, 4); /* XEN_ELFNOTE_PHYS32_ENTRY */
				off = desc + ((nh->n_descsz + 3) & ~3u);
			}
		}
	}
	uint64_t entry = eh->e_entry;
	munmap(f, st.st_size);
	close(fd);
	return entry;
}

/* ---- boot structures ---- */

struct e820 {
	uint64_t addr, size;
	uint32_t type;
};

static int memory_map(struct e820 *e)
{
	e[0] = (struct e820){ 0, EBDA_START, 1 };
	e[1] = (struct e820){ HIMEM_START, mem_size - HIMEM_START, 1 };
	return 2;
}

static void write_zero_page(const char *cmdline)
{
	uint8_t *zp = gpa(ZERO_PAGE_ADDR, 4096);
	struct e820 e[4];
	int n = memory_map(e);

	memset(zp, 0, 4096);
	*(uint16_t *)(zp + 0x1fe) = 0xaa55;	 /* hdr.boot_flag */
	*(uint32_t *)(zp + 0x202) = 0x53726448; /* hdr.header "HdrS" */
	zp[0x210] = 0xff;			 /* hdr.type_of_loader */
	*(uint32_t *)(zp + 0x214) = HIMEM_START; /* hdr.code32_start */
	*(uint32_t *)(zp + 0x230) = 0x01000000; /* hdr.kernel_alignment */
	*(uint32_t *)(zp + 0x228) = cmdline_addr;
	*(uint32_t *)(zp + 0x238) = (uint32_t)strlen(cmdline);
	zp[0x1e8] = (uint8_t)n;
	for (int i = 0; i < n; i++) {
		uint8_t *t = zp + 0x2d0 + 20 * i;
		memcpy(t, &e[i].addr, 8);
		memcpy(t + 8, &e[i].size, 8);
		memcpy(t + 16, &e[i].type, 4);
	}
}

static void write_pvh_info(void)
{
	uint8_t *si = gpa(PVH_INFO_ADDR, 0x38);
	struct e820 e[4];
	int n = memory_map(e);

	memset(si, 0, 0x38);
	*(uint32_t *)(si + 0x00) = 0x336ec578;	/* magic */
	*(uint32_t *)(si + 0x04) = 1;		/* version */
	*(uint64_t *)(si + 0x18) = cmdline_addr; /* cmdline_paddr */
	*(uint64_t *)(si + 0x28) = PVH_MEMMAP_ADDR;
	*(uint32_t *)(si + 0x30) = (uint32_t)n;
	for (int i = 0; i < n; i++) {
		uint8_t *t = gpa(PVH_MEMMAP_ADDR + 24 * i, 24);
		memset(t, 0, 24);
		memcpy(t, &e[i].addr, 8);
		memcpy(t + 8, &e[i].size, 8);
		memcpy(t + 16, &e[i].type, 4);
	}
}

static uint8_t checksum(const uint8_t *p, size_t n)
{
	uint8_t s = 0;
	while (n--)
		s += *p++;
	return (uint8_t)-s;
}

/* Intel MP table: floating pointer, then the configuration table (CPUs, ISA bus, IOAPIC). */
static void write_mptable(void)
{
	uint8_t *fp = gpa(EBDA_START, 1024);
	uint8_t *cfg = fp + 16;
	uint8_t *p = cfg + 0x2c;
	uint16_t entries = 0;

	memset(fp, 0, 1024);
	for (int i = 0; i < nvcpus; i++, entries++, p += 20) {
		p[0] = 0;				  /* processor */
		p[1] = (uint8_t)i;			  /* local APIC id */
		p[2] = 0x14;				  /* APIC version */
		p[3] = 0x01 | (i == 0 ? 0x02 : 0);	  /* enabled, BSP */
		*(uint32_t *)(p + 4) = 0x600;		  /* CPU signature */
		*(uint32_t *)(p + 8) = 0x201;		  /* features: FPU, APIC */
	}
	p[0] = 1; /* bus 0: ISA */
	p[1] = 0;
	memcpy(p + 2, "ISA   ", 6);
	p += 8, entries++;
	p[0] = 2; /* I/O APIC */
	p[1] = (uint8_t)nvcpus;
	p[2] = 0x11;
	p[3] = 1;
	*(uint32_t *)(p + 4) = 0xfec00000;
	p += 8, entries++;

	memcpy(cfg, "PCMP", 4);
	*(uint16_t *)(cfg + 4) = (uint16_t)(p - cfg); /* base table length */
	cfg[6] = 4;				     /* spec 1.4 */
	memcpy(cfg + 8, "FC      ", 8);
	memcpy(cfg + 16, "000000000000", 12);
	*(uint16_t *)(cfg + 0x22) = entries;
	*(uint32_t *)(cfg + 0x24) = 0xfee00000;
	cfg[7] = checksum(cfg, p - cfg);

	memcpy(fp, "_MP_", 4);
	*(uint32_t *)(fp + 4) = EBDA_START + 16;
	fp[8] = 1; /* length in 16-byte units */
	fp[9] = 4;
	fp[10] = checksum(fp, 16);
}

static void write_page_tables_and_gdt(void)
{
	uint64_t *pml4 = gpa(PML4_ADDR, 4096), *pdpt = gpa(PDPT_ADDR, 4096),
		 *pd = gpa(PD_ADDR, 4096);
	memset(pml4, 0, 4096);
	memset(pdpt, 0, 4096);
	pml4[0] = PDPT_ADDR | 3;
	pdpt[0] = PD_ADDR | 3;
	for (uint64_t i = 0; i < 512; i++)
		pd[i] = (i << 21) | 0x83;

	uint64_t *gdt = gpa(GDT_ADDR, 32);
	gdt[0] = 0;
	gdt[1] = pvh ? 0x00cf9b000000ffffULL : 0x00af9b000000ffffULL; /* code */
	gdt[2] = 0x00cf93000000ffffULL;				  /* data */
	gdt[3] = 0x008f8b000000ffffULL;				  /* TSS */
	*(uint64_t *)gpa(IDT_ADDR, 8) = 0;
}

/* ---- vCPUs ---- */

struct vcpu {
	int id, fd;
	struct kvm_run *run;
	pthread_t thread;
};

static struct vcpu vcpus[MAX_VCPUS];
static struct kvm_cpuid2 *cpuid;

static void setup_cpuid(struct vcpu *v)
{
	size_t sz = sizeof(*cpuid) + cpuid->nent * sizeof(cpuid->entries[0]);
	struct kvm_cpuid2 *c = malloc(sz);
	memcpy(c, cpuid, sz);
	for (unsigned i = 0; i < c->nent; i++) {
		struct kvm_cpuid_entry2 *e = &c->entries[i];
		if (e->function == 1)
			e->ebx = (e->ebx & 0x00ffffff) | ((uint32_t)v->id << 24);
		if (e->function == 0xb || e->function == 0x1f)
			e->edx = (uint32_t)v->id;
	}
	if (ioctl(v->fd, KVM_SET_CPUID2, c) < 0)
		die("KVM_SET_CPUID2: %s", strerror(errno));
	free(c);
}

static void setup_bsp(struct vcpu *v, uint64_t entry)
{
	struct kvm_sregs s;
	struct kvm_regs r;
	if (ioctl(v->fd, KVM_GET_SREGS, &s) < 0)
		die("KVM_GET_SREGS: %s", strerror(errno));

	struct kvm_segment code = { .base = 0, .limit = 0xffffffff, .selector = 0x08,
				    .type = 0xb, .present = 1, .dpl = 0, .s = 1, .g = 1 };
	struct kvm_segment data = code;
	data.selector = 0x10;
	data.type = 0x3;
	data.db = 1;
	struct kvm_segment tss = code;
	tss.selector = 0x18;
	tss.s = 0;
	if (pvh)
		code.db = 1;
	else
		code.l = 1;
	s.cs = code;
	s.ds = s.es = s.fs = s.gs = s.ss = data;
	s.tr = tss;
	s.gdt.base = GDT_ADDR;
	s.gdt.limit = 31;
	s.idt.base = IDT_ADDR;
	s.idt.limit = 7;
	if (pvh) {
		s.cr0 = 0x11; /* PE | ET, paging off */
		s.cr4 = 0;
		s.efer = 0;
	} else {
		s.cr0 = 0x80000011; /* PG | ET | PE */
		s.cr3 = PML4_ADDR;
		s.cr4 = 0x20;	 /* PAE */
		s.efer = 0x500;	 /* LME | LMA */
	}
	if (ioctl(v->fd, KVM_SET_SREGS, &s) < 0)
		die("KVM_SET_SREGS: %s", strerror(errno));

	memset(&r, 0, sizeof(r));
	r.rflags = 2;
	r.rip = entry;
	if (pvh) {
		r.rbx = PVH_INFO_ADDR;
	} else {
		r.rsp = r.rbp = BOOT_STACK;
		r.rsi = ZERO_PAGE_ADDR;
	}
	if (ioctl(v->fd, KVM_SET_REGS, &r) < 0)
		die("KVM_SET_REGS: %s", strerror(errno));
}

static void pio(struct vcpu *v)
{
	struct kvm_run *run = v->run;
	uint8_t *data = (uint8_t *)run + run->io.data_offset;
	uint16_t port = run->io.port;

	pthread_mutex_lock(&io_lock);
	for (uint32_t i = 0; i < run->io.count; i++, data += run->io.size) {
		if (run->io.direction == KVM_EXIT_IO_OUT) {
			if (port == 0x3fb) {
				uart_lcr = data[0];
			} else if (port == 0x3f8 && !(uart_lcr & 0x80)) { /* THR unless DLAB */
				fputc(data[0], stdout);
				fflush(stdout);
			} else if (port == 0x64 && data[0] == 0xfe) {
				finish(0, "i8042 reset requested by vcpu %d", v->id);
			}
		} else {
			uint8_t val = 0xff;
			if (port == 0x3fd) /* LSR: THR empty, idle, data ready */
				val = 0x60 | (input[input_pos] ? 0x01 : 0);
			else if (port == 0x3f8)
				val = input[input_pos] ? (uint8_t)input[input_pos++] : 0;
			else if (port == 0x3fa) /* IIR: FIFOs enabled, nothing pending */
				val = 0xc1;
			else if (port == 0x64) /* i8042 status: idle */
				val = 0x00;
			else if (port >= 0x3f9 && port <= 0x3ff)
				val = 0x00;
			memset(data, val, run->io.size);
		}
	}
	pthread_mutex_unlock(&io_lock);
}

static void mmio(struct vcpu *v)
{
	struct kvm_run *run = v->run;
	if (run->mmio.is_write && run->mmio.phys_addr == BOOT_TIMER_ADDR && run->mmio.len == 1) {
		fprintf(stderr, "kvm-boot: [%.3f ms] boot timer: vcpu %d wrote %u\n", elapsed_ms(),
			v->id, run->mmio.data[0]);
		return;
	}
	if (!run->mmio.is_write)
		memset(run->mmio.data, 0, sizeof(run->mmio.data));
}

static void *vcpu_loop(void *arg)
{
	struct vcpu *v = arg;
	for (;;) {
		if (ioctl(v->fd, KVM_RUN, 0) < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			finish(3, "vcpu %d: KVM_RUN: %s", v->id, strerror(errno));
		}
		switch (v->run->exit_reason) {
		case KVM_EXIT_IO:
			pio(v);
			break;
		case KVM_EXIT_MMIO:
			mmio(v);
			break;
		case KVM_EXIT_SHUTDOWN:
			finish(2, "vcpu %d: shutdown (triple fault)", v->id);
		case KVM_EXIT_HLT:
			finish(3, "vcpu %d: hlt without in-kernel irqchip", v->id);
		case KVM_EXIT_INTERNAL_ERROR: {
			struct kvm_regs r;
			ioctl(v->fd, KVM_GET_REGS, &r);
			finish(3, "vcpu %d: internal error, suberror %u, rip 0x%llx", v->id,
			       v->run->internal.suberror, (unsigned long long)r.rip);
		}
		default:
			finish(3, "vcpu %d: unexpected exit %u", v->id, v->run->exit_reason);
		}
	}
	return NULL;
}

static void on_alarm(int sig)
{
	(void)sig;
	finish(4, "timeout");
}

int main(int argc, char **argv)
{
	const char *cmdline = "", *path = NULL;
	unsigned mem_mib = 128, timeout = 20;

	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--pvh"))
			pvh = 1;
		else if (!strcmp(argv[i], "--smp") && i + 1 < argc)
			nvcpus = atoi(argv[++i]);
		else if (!strcmp(argv[i], "--mem") && i + 1 < argc)
			mem_mib = (unsigned)atoi(argv[++i]);
		else if (!strcmp(argv[i], "--cmdline") && i + 1 < argc)
			cmdline = argv[++i];
		else if (!strcmp(argv[i], "--cmdline-addr") && i + 1 < argc)
			cmdline_addr = strtoull(argv[++i], NULL, 0);
		else if (!strcmp(argv[i], "--input") && i + 1 < argc)
			input = argv[++i];
		else if (!strcmp(argv[i], "--timeout") && i + 1 < argc)
			timeout = (unsigned)atoi(argv[++i]);
		else if (argv[i][0] != '-' && !path)
			path = argv[i];
		else
			die("usage: kvm-boot [--pvh] [--smp N] [--mem MiB] [--cmdline STR] "
			    "[--cmdline-addr ADDR] [--input STR] [--timeout SEC] GUEST.elf");
	}
	if (!path)
		die("no guest image given");
	if (nvcpus < 1 || nvcpus > MAX_VCPUS)
		die("--smp must be 1..%d", MAX_VCPUS);
	if (mem_mib < 16 || mem_mib > 3072)
		die("--mem must be 16..3072 MiB");
	if (strlen(cmdline) >= CMDLINE_MAX)
		die("command line too long");

	mem_size = (uint64_t)mem_mib << 20;
	mem = mmap(NULL, mem_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
		   -1, 0);
	if (mem == MAP_FAILED)
		die("cannot allocate guest memory");

	kvm_fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm_fd < 0)
		die("/dev/kvm: %s", strerror(errno));
	vm_fd = ioctl(kvm_fd, KVM_CREATE_VM, 0);
	if (vm_fd < 0)
		die("KVM_CREATE_VM: %s", strerror(errno));
	if (ioctl(vm_fd, KVM_SET_TSS_ADDR, 0xfffbd000UL) < 0)
		die("KVM_SET_TSS_ADDR: %s", strerror(errno));
	uint64_t ident = 0xfffbc000;
	ioctl(vm_fd, KVM_SET_IDENTITY_MAP_ADDR, &ident);
	if (ioctl(vm_fd, KVM_CREATE_IRQCHIP, 0) < 0)
		die("KVM_CREATE_IRQCHIP: %s", strerror(errno));
	struct kvm_pit_config pit = { .flags = KVM_PIT_SPEAKER_DUMMY };
	if (ioctl(vm_fd, KVM_CREATE_PIT2, &pit) < 0)
		die("KVM_CREATE_PIT2: %s", strerror(errno));
	struct kvm_userspace_memory_region region = {
		.slot = 0, .guest_phys_addr = 0, .memory_size = mem_size,
		.userspace_addr = (uint64_t)(uintptr_t)mem,
	};
	if (ioctl(vm_fd, KVM_SET_USER_MEMORY_REGION, &region) < 0)
		die("KVM_SET_USER_MEMORY_REGION: %s", strerror(errno));

	uint32_t pvh_entry;
	uint64_t entry = load_elf(path, &pvh_entry);
	if (pvh) {
		if (!pvh_entry)
			die("--pvh: %s has no XEN_ELFNOTE_PHYS32_ENTRY note", path);
		entry = pvh_entry;
	}
	strcpy(gpa(cmdline_addr, CMDLINE_MAX), cmdline);
	write_page_tables_and_gdt();
	if (pvh)
		write_pvh_info();
	else
		write_zero_page(cmdline);
	write_mptable();

	int nent = 256;
	cpuid = calloc(1, sizeof(*cpuid) + nent * sizeof(cpuid->entries[0]));
	cpuid->nent = nent;
	if (ioctl(kvm_fd, KVM_GET_SUPPORTED_CPUID, cpuid) < 0)
		die("KVM_GET_SUPPORTED_CPUID: %s", strerror(errno));

	int run_size = ioctl(kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0);
	for (int i = 0; i < nvcpus; i++) {
		struct vcpu *v = &vcpus[i];
		v->id = i;
		v->fd = ioctl(vm_fd, KVM_CREATE_VCPU, i);
		if (v->fd < 0)
			die("KVM_CREATE_VCPU %d: %s", i, strerror(errno));
		v->run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, v->fd, 0);
		if (v->run == MAP_FAILED)
			die("mmap kvm_run");
		setup_cpuid(v);
	}
	setup_bsp(&vcpus[0], entry);

	fprintf(stderr, "kvm-boot: %s entry 0x%llx, %d vCPU(s), %u MiB, cmdline \"%s\"\n",
		pvh ? "pvh" : "linux64", (unsigned long long)entry, nvcpus, mem_mib, cmdline);
	signal(SIGALRM, on_alarm);
	alarm(timeout);
	clock_gettime(CLOCK_MONOTONIC, &t_start);
	for (int i = 1; i < nvcpus; i++)
		pthread_create(&vcpus[i].thread, NULL, vcpu_loop, &vcpus[i]);
	vcpu_loop(&vcpus[0]);
	return 0;
}
