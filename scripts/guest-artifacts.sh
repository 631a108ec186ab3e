#!/usr/bin/env bash
# Builds the guest artifacts for flick's Linux-guest tests, or finds them in
# the cache:
#   - a Linux 6.1 kernel (vmlinux ELF with the PVH note, and bzImage) from
#     Debian's linux-source-6.1, tinyconfig + resources/guest/linux/config.fragment
#     + resources/guest/linux/patches/*.patch;
#   - a busybox-static root file system whose /init is resources/guest/rootfs/init,
#     with /bin/flick-vsock (resources/guest/rootfs/flick-vsock.c, built static),
#     as an ext4 image and as an uncompressed newc cpio initramfs;
#   - with --arm64-kernel, instead of both: an arm64 Linux 6.1 kernel (the
#     uncompressed Image) from the same source, cross-compiled with Debian's
#     gcc-aarch64-linux-gnu, tinyconfig + resources/guest/linux/config-arm64.fragment.
#
# Prints shell assignments on stdout, progress on stderr:
#   eval "$(scripts/guest-artifacts.sh)"
#
# See docs/guest-artifacts.md.
set -euo pipefail

usage() {
	cat <<'EOF'
Usage: scripts/guest-artifacts.sh [--kernel-only | --rootfs-only | --arm64-kernel] [--force]

Builds (or finds in the cache) the guest kernel and root file system used by
flick's Linux-guest tests and prints their paths:

  FLICK_KERNEL_VMLINUX=...   vmlinux (ELF, PVH entry note)
  FLICK_KERNEL_BZIMAGE=...   bzImage
  FLICK_ROOTFS_EXT4=...      ext4 image (label flickroot)
  FLICK_INITRAMFS=...        uncompressed newc cpio

or, with --arm64-kernel, only

  FLICK_KERNEL_ARM64_IMAGE=...  arm64 Image (uncompressed)

Use it as:  eval "$(scripts/guest-artifacts.sh)"

Options:
  --kernel-only    only the kernel
  --rootfs-only    only the root file system images
  --arm64-kernel   only the arm64 kernel (cross-compiled), nothing else
  --force          rebuild even if the cache has the artifacts
  -h, --help       this text

Environment:
  FLICK_CACHE_DIR   cache root (default: $HOME/.cache/flick); artifacts go to
                    $FLICK_CACHE_DIR/guest/{kernel,rootfs,kernel-arm64}-<hash of inputs>/

Missing Debian packages are installed with apt-get (needs root).
EOF
}

want_kernel=1
want_rootfs=1
want_arm64=0
force=0
while (($#)); do
	case $1 in
	--kernel-only) want_rootfs=0 ;;
	--rootfs-only) want_kernel=0 ;;
	--arm64-kernel) want_arm64=1 ;;
	--force) force=1 ;;
	-h | --help)
		usage
		exit 0
		;;
	*)
		echo "guest-artifacts: unknown argument: $1" >&2
		usage >&2
		exit 2
		;;
	esac
	shift
done
if ((want_arm64)); then
	if ((!want_kernel || !want_rootfs)); then
		echo "guest-artifacts: --arm64-kernel excludes --kernel-only and --rootfs-only" >&2
		exit 2
	fi
	want_kernel=0
	want_rootfs=0
elif ((!want_kernel && !want_rootfs)); then
	echo "guest-artifacts: --kernel-only and --rootfs-only exclude each other" >&2
	exit 2
fi

SCRIPT=$(readlink -f "${BASH_SOURCE[0]}")
REPO=$(cd "$(dirname "$SCRIPT")/.." && pwd)
GUEST_SRC=$REPO/resources/guest
FRAGMENT=$GUEST_SRC/linux/config.fragment
FRAGMENT_ARM64=$GUEST_SRC/linux/config-arm64.fragment
PATCH_DIR=$GUEST_SRC/linux/patches
INIT_SCRIPT=$GUEST_SRC/rootfs/init
VSOCK_SRC=$GUEST_SRC/rootfs/flick-vsock.c
LINUX_TARBALL=/usr/src/linux-source-6.1.tar.xz
BUSYBOX=/bin/busybox
ROOTFS_SIZE_MIB=32
ROOTFS_LABEL=flickroot

CACHE=${FLICK_CACHE_DIR:-${HOME:-/root}/.cache/flick}/guest

START=$SECONDS
say() { printf '[guest-artifacts %4ds] %s\n' $((SECONDS - START)) "$*" >&2; }
die() {
	printf '[guest-artifacts %4ds] ERROR: %s\n' $((SECONDS - START)) "$*" >&2
	exit 1
}

# Temporary build directories; removed on any exit, so an interrupted or
# failed build never leaves anything that looks like a finished artifact.
TMP_DIRS=()
cleanup() {
	local d
	for d in "${TMP_DIRS[@]}"; do
		[[ -n $d && -e $d ]] && rm -rf -- "$d"
	done
	return 0
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Both kernels are built here: the x86 one natively, the arm64 one with
# Debian's amd64 cross compiler.
[[ $(uname -m) == x86_64 ]] || die "runs on x86_64 hosts only (the arm64 kernel is cross-compiled); this host is $(uname -m)"

# ---------------------------------------------------------------------------
# Debian packages
# ---------------------------------------------------------------------------
pkgs=()
if ((want_kernel)); then
	pkgs+=(linux-source-6.1 build-essential patch flex bison bc libelf-dev xz-utils lz4)
fi
if ((want_rootfs)); then
	pkgs+=(busybox-static e2fsprogs cpio)
fi
if ((want_arm64)); then
	pkgs+=(linux-source-6.1 build-essential gcc-aarch64-linux-gnu flex bison bc xz-utils)
fi

missing=()
installed=$(dpkg-query -W -f='${Package} ${db:Status-Abbrev}\n' "${pkgs[@]}" 2>/dev/null || true)
for p in "${pkgs[@]}"; do
	grep -q "^$p ii" <<<"$installed" || missing+=("$p")
done
if ((${#missing[@]})); then
	((EUID == 0)) || die "missing Debian packages (run as root to install them): ${missing[*]}"
	say "installing Debian packages: ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -q >&2
	apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
fi

pkg_version() { dpkg-query -W -f='${Version}' "$1"; }

hash_inputs() { sha256sum | cut -c1-16; }

mkdir -p "$CACHE"

# Removes temporary directories left behind by builds that were killed
# (their process id is the last part of the name and no longer runs).
prune_stale() {
	local d pid
	for d in "$CACHE"/.tmp-*; do
		[[ -e $d ]] || continue
		pid=${d##*.}
		[[ $pid =~ ^[0-9]+$ ]] || continue
		kill -0 "$pid" 2>/dev/null || rm -rf -- "$d"
	done
}

# publish STAGING FINAL: moves a finished staging directory into place with a
# rename, so FINAL either does not exist or is complete.
publish() {
	local staging=$1 final=$2 old
	if [[ -e $final ]]; then
		old=$CACHE/.tmp-old-$(basename "$final").$$
		TMP_DIRS+=("$old")
		mv -T -- "$final" "$old"
	fi
	mv -T -- "$staging" "$final"
}

# has_files DIR FILE...: whether DIR holds every FILE, each non-empty.
has_files() {
	local dir=$1 f
	shift
	for f; do
		[[ -s $dir/$f ]] || return 1
	done
}

# cached NAME DIR FILES BUILD [ARG...]: unless DIR already holds the FILES (a
# space-separated list of names) or --force was given, runs BUILD ARG...,
# which must publish DIR. Builds of the same NAME wait for each other (flock
# on $CACHE/.lock-NAME); a build that another process finished meanwhile is
# not repeated.
cached() {
	local name=$1 dir=$2 files lock
	read -ra files <<<"$3"
	shift 3
	if ((!force)) && has_files "$dir" "${files[@]}"; then
		say "$name: cached: $dir"
		return 0
	fi
	exec {lock}>"$CACHE/.lock-$name"
	flock -n "$lock" || { say "$name: waiting for another build to finish"; flock "$lock"; }
	if ((!force)) && has_files "$dir" "${files[@]}"; then
		say "$name: built by another process: $dir"
	else
		prune_stale
		say "$name: building into $dir"
		"$@"
		say "$name: done"
	fi
	exec {lock}>&-
}

# ---------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------
# Both kernels go through the same steps (extract, patch, configure, check the
# configuration, build, collect, publish); kernel_flavour sets what differs:
#   K_NAME      name of the cache directory, the lock and the log
#   K_FRAGMENT  configuration fragment merged into tinyconfig
#   K_MAKE      make arguments choosing the architecture and the compiler
#   K_CC        the C compiler (its version is part of the cache key)
#   K_PATCHES   patches applied to the source, in order
#   K_TARGETS   make targets
#   K_FILES     the images a finished cache directory holds
#   K_COLLECT   COLLECT SRC OUT: copies the images from SRC to OUT, checks them
kernel_flavour() {
	case $1 in
	x86)
		K_NAME=kernel
		K_FRAGMENT=$FRAGMENT
		K_MAKE=()
		K_CC=gcc
		shopt -s nullglob
		K_PATCHES=("$PATCH_DIR"/*.patch)
		shopt -u nullglob
		K_TARGETS=(vmlinux bzImage)
		K_FILES=(vmlinux bzImage)
		K_COLLECT=collect_x86
		;;
	arm64)
		K_NAME=kernel-arm64
		K_FRAGMENT=$FRAGMENT_ARM64
		K_MAKE=(ARCH=arm64 CROSS_COMPILE=aarch64-linux-gnu-)
		K_CC=aarch64-linux-gnu-gcc
		# None of patches/ is applied. All four change arch/x86 files only
		# (alternative.c, fpu/core.c, mm/fault.c, mm/init.c) for what KVM's
		# x86 instruction emulator on PVM hosts cannot run; arm64 has no such
		# emulation. They would apply harmlessly, as arm64 never compiles
		# those files, and 0004's idea (no poisoning of freed init memory) is
		# not x86-specific, but the arm64 build skips them all the same.
		K_PATCHES=()
		K_TARGETS=(Image)
		K_FILES=(Image)
		K_COLLECT=collect_arm64
		;;
	*) die "unknown kernel flavour: $1" ;;
	esac
}

collect_x86() {
	local src=$1 out=$2
	cp "$src/vmlinux" "$out/vmlinux"
	cp "$src/arch/x86/boot/bzImage" "$out/bzImage"
	# XEN_ELFNOTE_PHYS32_ENTRY (type 18) is the PVH entry point.
	if ! readelf -n "$out/vmlinux" | grep -qiE '^[[:space:]]*Xen[[:space:]].*(0x00000012|PHYS32_ENTRY)'; then
		die "kernel: vmlinux has no Xen PVH entry note (CONFIG_PVH)"
	fi
}

collect_arm64() {
	local src=$1 out=$2 magic
	cp "$src/arch/arm64/boot/Image" "$out/Image"
	# The arm64 boot header (Documentation/arm64/booting.rst) has the magic
	# "ARM\x64" at offset 56.
	magic=$(dd if="$out/Image" bs=1 skip=56 count=4 status=none)
	[[ $magic == ARMd ]] || die "$K_NAME: Image has no arm64 boot header (bytes 56-59: '$magic', expected 'ARMd')"
}

# check_fragment CONFIG: every option of the fragment must have survived
# olddefconfig: an option whose dependencies are not met is dropped silently
# otherwise.
check_fragment() {
	local config=$1 line opt val bad=()
	while IFS= read -r line; do
		if [[ $line =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
			opt=${BASH_REMATCH[1]}
			val=${BASH_REMATCH[2]}
			grep -qxF -- "$opt=$val" "$config" ||
				bad+=("$opt=$val (got: $(grep -E "^(# )?${opt}[= ]" "$config" || echo unset))")
		elif [[ $line =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
			opt=${BASH_REMATCH[1]}
			if grep -qE "^$opt=" "$config"; then
				bad+=("$opt off (got: $(grep -E "^$opt=" "$config"))")
			fi
		fi
	done <"$K_FRAGMENT"
	if ((${#bad[@]})); then
		for line in "${bad[@]}"; do
			echo "  $line" >&2
		done
		die "$K_NAME: ${#bad[@]} option(s) of $(basename "$K_FRAGMENT") did not survive olddefconfig (see above)"
	fi
}

build_kernel() {
	local dir=$1 key=$2 log=$3 tmp src out p line
	tmp=$CACHE/.tmp-$K_NAME-$key.$$
	TMP_DIRS+=("$tmp")
	rm -rf -- "$tmp"
	mkdir -p "$tmp/out" "$(dirname "$log")"
	src=$tmp/linux-source-6.1
	out=$tmp/out
	: >"$log"
	say "$K_NAME: build log: $log"

	say "$K_NAME: extracting $LINUX_TARBALL"
	tar -xJf "$LINUX_TARBALL" -C "$tmp"
	[[ -f $src/Makefile ]] || die "$K_NAME: $LINUX_TARBALL did not contain linux-source-6.1/"

	for p in "${K_PATCHES[@]}"; do
		say "$K_NAME: applying $(basename "$p")"
		echo "=== patch -p1 < $p" >>"$log"
		if ! patch -d "$src" -p1 --forward --batch <"$p" >>"$log" 2>&1; then
			tail -n 20 "$log" >&2
			die "$K_NAME: patch $(basename "$p") does not apply to linux-source-6.1 $(pkg_version linux-source-6.1)"
		fi
	done

	say "$K_NAME: configuring (tinyconfig + $(basename "$K_FRAGMENT"))"
	if ! {
		echo "=== make ${K_MAKE[*]} tinyconfig" &&
			make -C "$src" "${K_MAKE[@]}" tinyconfig &&
			echo "=== merge_config.sh -m .config $K_FRAGMENT" &&
			(cd "$src" && scripts/kconfig/merge_config.sh -m .config "$K_FRAGMENT") &&
			echo "=== make ${K_MAKE[*]} olddefconfig" &&
			make -C "$src" "${K_MAKE[@]}" olddefconfig
	} >>"$log" 2>&1; then
		tail -n 40 "$log" >&2
		die "$K_NAME: configuration failed (log: $log)"
	fi
	check_fragment "$src/.config"

	say "$K_NAME: make -j$(nproc) ${K_TARGETS[*]} (a few minutes)"
	local next=$((SECONDS + 30)) last=
	if ! make -C "$src" "${K_MAKE[@]}" -j"$(nproc)" KBUILD_BUILD_USER=flick KBUILD_BUILD_HOST=flick \
		"${K_TARGETS[@]}" 2>&1 | while IFS= read -r line; do
			printf '%s\n' "$line" >>"$log"
			last=$line
			if ((SECONDS >= next)); then
				say "$K_NAME: building... ${last:0:100}"
				next=$((SECONDS + 30))
			fi
		done; then
		echo "--- last lines of $log:" >&2
		tail -n 40 "$log" >&2
		die "$K_NAME: build failed (log: $log)"
	fi

	"$K_COLLECT" "$src" "$out"
	cp "$src/.config" "$out/config"
	cp "$src/System.map" "$out/System.map"
	cp "$log" "$out/build.log"
	publish "$out" "$dir"
	rm -rf -- "$tmp"
}

# kernel FLAVOUR (x86 or arm64): builds or finds that kernel; sets KERNEL_DIR.
kernel() {
	local key dir log p
	kernel_flavour "$1"
	key=$(
		{
			echo "$K_NAME"
			sha256sum "$SCRIPT" "$K_FRAGMENT" | cut -d' ' -f1
			for p in "${K_PATCHES[@]}"; do
				echo "$(basename "$p") $(sha256sum <"$p" | cut -d' ' -f1)"
			done
			pkg_version linux-source-6.1
			echo
			"$K_CC" -dumpfullversion
		} | hash_inputs
	)
	dir=$CACHE/$K_NAME-$key
	log=$CACHE/logs/$K_NAME-$key.log
	cached "$K_NAME" "$dir" "${K_FILES[*]}" build_kernel "$dir" "$key" "$log"
	KERNEL_DIR=$dir
}

# ---------------------------------------------------------------------------
# Root file system
# ---------------------------------------------------------------------------
build_rootfs() {
	local dir=$1 key=$2 tmp root out a applets
	tmp=$CACHE/.tmp-rootfs-$key.$$
	TMP_DIRS+=("$tmp")
	rm -rf -- "$tmp"
	root=$tmp/root
	out=$tmp/out
	mkdir -p "$out" "$root"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,root,etc}
	chmod 1777 "$root/tmp"
	chmod 700 "$root/root"

	say "rootfs: busybox $(pkg_version busybox-static)"
	applets=$("$BUSYBOX" --list)
	for a in sh mount devmem poweroff reboot setsid cttyhack cat echo grep wc sleep rm stty; do
		grep -qx "$a" <<<"$applets" || die "rootfs: $BUSYBOX has no '$a' applet"
	done
	cp "$BUSYBOX" "$root/bin/busybox"
	while IFS= read -r a; do
		case $a in "" | bin/busybox | sbin/init | linuxrc) continue ;; esac
		mkdir -p "$root/$(dirname "$a")"
		[[ -e $root/$a || -L $root/$a ]] || ln -s /bin/busybox "$root/$a"
	done < <("$BUSYBOX" --list-full)
	install -m 0755 "$INIT_SCRIPT" "$root/init"
	say "rootfs: /bin/flick-vsock (static, from $(basename "$VSOCK_SRC"))"
	gcc -static -O2 -Wall -Wextra -Werror -o "$root/bin/flick-vsock" "$VSOCK_SRC" ||
		die "rootfs: building flick-vsock failed"
	strip "$root/bin/flick-vsock"
	ln -s ../init "$root/sbin/init"
	# The kernel opens /dev/console for init before anything mounts devtmpfs
	# when it boots from the initramfs.
	mknod -m 600 "$root/dev/console" c 5 1 ||
		say "rootfs: warning: cannot create /dev/console (not root?)"
	chown -R 0:0 "$root" 2>/dev/null || true

	say "rootfs: ext4 image (${ROOTFS_SIZE_MIB} MiB, label $ROOTFS_LABEL)"
	mkfs.ext4 -q -F -b 4096 -L "$ROOTFS_LABEL" -d "$root" "$out/rootfs.ext4" "${ROOTFS_SIZE_MIB}M" >/dev/null
	e2fsck -fn "$out/rootfs.ext4" >/dev/null 2>&1 || die "rootfs: e2fsck found errors in the new ext4 image"

	say "rootfs: uncompressed newc cpio initramfs"
	(cd "$root" && find . -mindepth 1 | LC_ALL=C sort |
		cpio --quiet -o -H newc -R 0:0 --reproducible) >"$out/initramfs.cpio"
	cpio --quiet -it <"$out/initramfs.cpio" | grep -qx init || die "rootfs: the initramfs has no /init"

	publish "$out" "$dir"
	rm -rf -- "$tmp"
}

rootfs() {
	local key dir
	key=$(
		{
			echo "rootfs"
			sha256sum "$SCRIPT" "$INIT_SCRIPT" "$VSOCK_SRC" | cut -d' ' -f1
			gcc -dumpfullversion
			pkg_version busybox-static
			echo
			pkg_version e2fsprogs
			echo
			pkg_version cpio
			echo
		} | hash_inputs
	)
	dir=$CACHE/rootfs-$key
	cached rootfs "$dir" "rootfs.ext4 initramfs.cpio" build_rootfs "$dir" "$key"
	ROOTFS_DIR=$dir
}

if ((want_kernel)); then kernel x86; fi
if ((want_rootfs)); then rootfs; fi
if ((want_arm64)); then kernel arm64; fi

if ((want_kernel)); then
	echo "FLICK_KERNEL_VMLINUX=$KERNEL_DIR/vmlinux"
	echo "FLICK_KERNEL_BZIMAGE=$KERNEL_DIR/bzImage"
fi
if ((want_rootfs)); then
	echo "FLICK_ROOTFS_EXT4=$ROOTFS_DIR/rootfs.ext4"
	echo "FLICK_INITRAMFS=$ROOTFS_DIR/initramfs.cpio"
fi
if ((want_arm64)); then
	echo "FLICK_KERNEL_ARM64_IMAGE=$KERNEL_DIR/Image"
fi
