/*
 * Boot information from the VMM: the Linux zero page (boot_params) or the Xen PVH
 * struct hvm_start_info. Everything is copied into struct bootinfo so that later code
 * does not depend on where the VMM put it.
 */
#include "tg.h"

/* Linux boot_params (Documentation/arch/x86/zero-page.rst, boot.rst). */
#define BP_SIZE 0x1000
#define BP_E820_ENTRIES 0x1e8		/* u8 */
#define BP_HDR_CMD_LINE_PTR 0x228	/* u32 */
#define BP_HDR_CMDLINE_SIZE 0x238	/* u32 */
#define BP_E820_TABLE 0x2d0		/* 128 x {u64 addr, u64 size, u32 type} */
#define BP_E820_MAX 128
#define BP_E820_ENTRY_SIZE 20

/* Xen public arch-x86/hvm/start_info.h. */
#define HVM_START_MAGIC 0x336ec578
#define SI_MAGIC 0x00			/* u32 */
#define SI_VERSION 0x04			/* u32 */
#define SI_CMDLINE_PADDR 0x18		/* u64 */
#define SI_MEMMAP_PADDR 0x28		/* u64, version >= 1 */
#define SI_MEMMAP_ENTRIES 0x30		/* u32, version >= 1 */
#define SI_SIZE_V0 0x28
#define SI_SIZE_V1 0x38
#define SI_MEMMAP_ENTRY_SIZE 24		/* {u64 addr, u64 size, u32 type, u32 reserved} */

static u32 rd32(u64 addr)
{
	u32 v;
	memcpy(&v, phys(addr), sizeof(v));
	return v;
}

static u64 rd64(u64 addr)
{
	u64 v;
	memcpy(&v, phys(addr), sizeof(v));
	return v;
}

void bootinfo_add_reserved(struct bootinfo *bi, u64 start, u64 len)
{
	if (len == 0 || bi->nr_reserved >= MAX_RESERVED)
		return;
	bi->reserved[bi->nr_reserved].start = start;
	bi->reserved[bi->nr_reserved].end = start + len;
	bi->nr_reserved++;
}

/* Length of the NUL-terminated string at addr: at most max, and within the map. */
static u32 cmdline_length(u64 addr, u64 max)
{
	if (max > IDENTITY_MAP_END - addr)
		max = IDENTITY_MAP_END - addr;
	return (u32)strnlen(phys(addr), max);
}

/* Copy the NUL-terminated command line at addr (at most max bytes, 0 = no limit). */
static void copy_cmdline(struct bootinfo *bi, u64 addr, u64 max)
{
	if (!phys_ok(addr, 1))
		return;
	if (max == 0 || max > MAX_CMDLINE - 1)
		max = MAX_CMDLINE - 1;
	u32 n = cmdline_length(addr, max);
	memcpy(bi->cmdline, phys(addr), n);
	bi->cmdline[n] = '\0';
	bi->cmdline_len = n;
	bootinfo_add_reserved(bi, addr, n + 1);
}

static void add_mem(struct bootinfo *bi, u64 addr, u64 size, u32 type)
{
	if (bi->nr_mem >= MAX_MEMMAP)
		return;
	bi->mem[bi->nr_mem].addr = addr;
	bi->mem[bi->nr_mem].size = size;
	bi->mem[bi->nr_mem].type = type;
	bi->nr_mem++;
}

static void parse_linux(struct bootinfo *bi, u64 bp)
{
	if (!phys_ok(bp, BP_SIZE))
		return;
	bi->valid = 1;
	bootinfo_add_reserved(bi, bp, BP_SIZE);

	u32 n = *(const u8 *)phys(bp + BP_E820_ENTRIES);
	if (n > BP_E820_MAX)
		n = BP_E820_MAX;
	for (u32 i = 0; i < n; i++) {
		u64 e = bp + BP_E820_TABLE + (u64)i * BP_E820_ENTRY_SIZE;
		add_mem(bi, rd64(e), rd64(e + 8), rd32(e + 16));
	}

	copy_cmdline(bi, rd32(bp + BP_HDR_CMD_LINE_PTR), rd32(bp + BP_HDR_CMDLINE_SIZE));
}

static void parse_pvh(struct bootinfo *bi, u64 si)
{
	if (!phys_ok(si, SI_SIZE_V0) || rd32(si + SI_MAGIC) != HVM_START_MAGIC)
		return;
	bi->valid = 1;

	u32 version = rd32(si + SI_VERSION);
	bootinfo_add_reserved(bi, si, version >= 1 ? SI_SIZE_V1 : SI_SIZE_V0);

	if (version >= 1) {
		u64 map = rd64(si + SI_MEMMAP_PADDR);
		u32 n = rd32(si + SI_MEMMAP_ENTRIES);
		if (n > MAX_MEMMAP)
			n = MAX_MEMMAP;
		if (n && phys_ok(map, (u64)n * SI_MEMMAP_ENTRY_SIZE)) {
			bootinfo_add_reserved(bi, map, (u64)n * SI_MEMMAP_ENTRY_SIZE);
			for (u32 i = 0; i < n; i++) {
				u64 e = map + (u64)i * SI_MEMMAP_ENTRY_SIZE;
				add_mem(bi, rd64(e), rd64(e + 8), rd32(e + 16));
			}
		}
	}

	copy_cmdline(bi, rd64(si + SI_CMDLINE_PADDR), 0);
}

/*
 * Where the VMM's command line is, without copying anything: used before the
 * boot-timer write, which should come as early as possible.
 */
const char *bootinfo_early_cmdline(u32 protocol, u64 info, u32 *len)
{
	u64 addr = 0, max = MAX_CMDLINE - 1;

	if (protocol == PROTO_PVH) {
		if (phys_ok(info, SI_SIZE_V0) && rd32(info + SI_MAGIC) == HVM_START_MAGIC)
			addr = rd64(info + SI_CMDLINE_PADDR);
	} else if (phys_ok(info, BP_SIZE)) {
		addr = rd32(info + BP_HDR_CMD_LINE_PTR);
		u32 size = rd32(info + BP_HDR_CMDLINE_SIZE);
		if (size && size < max)
			max = size;
	}
	*len = 0;
	if (!phys_ok(addr, 1))
		return "";
	*len = cmdline_length(addr, max);
	return phys(addr);
}

/* Fills every field of *bi; large arrays are only written up to their counts. */
void bootinfo_parse(u32 protocol, u64 info, struct bootinfo *bi)
{
	bi->valid = 0;
	bi->cmdline[0] = '\0';
	bi->cmdline_len = 0;
	bi->nr_mem = 0;
	bi->nr_reserved = 0;
	bi->protocol = protocol;
	bi->info_addr = info;
	if (protocol == PROTO_PVH) {
		bi->protocol_name = "pvh";
		parse_pvh(bi, info);
	} else {
		bi->protocol_name = "linux64";
		parse_linux(bi, info);
	}
}
