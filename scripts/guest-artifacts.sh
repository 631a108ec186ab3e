#!/usr/bin/env bash
# Builds the guest artifacts for flick's Linux-guest tests, or finds them in
# the cache, for x86_64 (the default) or arm64 (--arch arm64):
#   - a Linux 6.1 kernel from Debian's linux-source-6.1, tinyconfig + a
#     fragment in resources/guest/linux/: for x86_64 the vmlinux ELF with the
#     PVH note and the bzImage (config.fragment + patches/*.patch), for arm64
#     the uncompressed Image (config-arm64.fragment), cross-compiled with
#     Debian's gcc-aarch64-linux-gnu;
#   - a busybox-static root file system whose /init is resources/guest/rootfs/init,
#     with /bin/flick-vsock (resources/guest/rootfs/flick-vsock.c, built static),
#     as an ext4 image and as an uncompressed newc cpio initramfs. For arm64 the
#     busybox binary comes from Debian's busybox-static:arm64, downloaded by
#     package name and extracted (never installed).
#
# Prints shell assignments on stdout, progress on stderr:
#   eval "$(scripts/guest-artifacts.sh)"
#
# See docs/guest-artifacts.md.
set -euo pipefail

usage() {
	cat <<'EOF'
Usage: scripts/guest-artifacts.sh [--arch x86_64|arm64] [--kernel-only | --rootfs-only] [--force]

Builds (or finds in the cache) the guest kernel and root file system used by
flick's Linux-guest tests and prints their paths. For x86_64:

  FLICK_KERNEL_VMLINUX=...   vmlinux (ELF, PVH entry note)
  FLICK_KERNEL_BZIMAGE=...   bzImage
  FLICK_ROOTFS_EXT4=...      ext4 image (label flickroot)
  FLICK_INITRAMFS=...        uncompressed newc cpio

for arm64:

  FLICK_KERNEL_ARM64_IMAGE=...   arm64 Image (uncompressed)
  FLICK_ROOTFS_ARM64_EXT4=...    ext4 image (label flickroot)
  FLICK_INITRAMFS_ARM64=...      uncompressed newc cpio

Use it as:  eval "$(scripts/guest-artifacts.sh)"

Options:
  --arch ARCH      x86_64 (default) or arm64 (cross-compiled on this x86_64 host)
  --kernel-only    only the kernel
  --rootfs-only    only the root file system images
  --arm64-kernel   the same as --arch arm64 --kernel-only
  --force          rebuild even if the cache has the artifacts
  -h, --help       this text

Environment:
  FLICK_CACHE_DIR   cache root (default: $HOME/.cache/flick); artifacts go to
                    $FLICK_CACHE_DIR/guest/{kernel,rootfs,kernel-arm64,rootfs-arm64}-<hash of inputs>/

Missing Debian packages are installed with apt-get, and busybox-static:arm64
is fetched with apt-get download while dpkg has the arm64 architecture added
for that moment (both need root).
EOF
}

want_kernel=1
want_rootfs=1
arch=x86_64
force=0
while (($#)); do
	case $1 in
	--kernel-only) want_rootfs=0 ;;
	--rootfs-only) want_kernel=0 ;;
	--arch)
		(($# >= 2)) || { echo "guest-artifacts: --arch needs a value (x86_64 or arm64)" >&2; exit 2; }
		arch=$2
		shift
		;;
	--arch=*) arch=${1#--arch=} ;;
	--arm64-kernel)
		arch=arm64
		want_rootfs=0
		;;
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
case $arch in
x86_64 | amd64 | x86) arch=x86_64 ;;
arm64 | aarch64) arch=arm64 ;;
*)
	echo "guest-artifacts: unknown architecture: $arch (x86_64 or arm64)" >&2
	exit 2
	;;
esac
if ((!want_kernel && !want_rootfs)); then
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
	pkgs+=(linux-source-6.1 build-essential flex bison bc xz-utils)
	case $arch in
	x86_64) pkgs+=(patch libelf-dev lz4) ;;
	arm64) pkgs+=(gcc-aarch64-linux-gnu) ;;
	esac
fi
if ((want_rootfs)); then
	pkgs+=(e2fsprogs cpio)
	case $arch in
	x86_64) pkgs+=(busybox-static) ;;
	# busybox:arm64 lists its applets under qemu-user; flick-vsock is cross-compiled.
	arm64) pkgs+=(qemu-user-static gcc-aarch64-linux-gnu libc6-dev-arm64-cross binutils-aarch64-linux-gnu) ;;
	esac
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
			# The steps that make a kernel, not the whole script: a change to the root file
			# system's steps does not rebuild the kernels.
			declare -f kernel_flavour check_fragment build_kernel "$K_COLLECT" | sha256sum | cut -d' ' -f1
			sha256sum "$K_FRAGMENT" | cut -d' ' -f1
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
# Root file systems
# ---------------------------------------------------------------------------
# rootfs_flavour ARCH sets what differs between the two root file systems:
#   R_NAME     name of the cache directory and the lock
#   R_BUSYBOX  the busybox-static binary that goes in
#   R_RUN      how to run that binary here (empty: directly)
#   R_CC       C compiler for flick-vsock (static), and R_STRIP
#   R_BUSYBOX_VERSION  the busybox package version, for the cache key
rootfs_flavour() {
	case $1 in
	x86_64)
		R_NAME=rootfs
		R_BUSYBOX=$BUSYBOX
		R_RUN=()
		R_CC=gcc
		R_STRIP=strip
		R_BUSYBOX_VERSION=$(pkg_version busybox-static)
		;;
	arm64)
		R_NAME=rootfs-arm64
		busybox_arm64
		R_BUSYBOX=$BUSYBOX_ARM64
		R_RUN=(qemu-aarch64-static)
		R_CC=aarch64-linux-gnu-gcc
		R_STRIP=aarch64-linux-gnu-strip
		R_BUSYBOX_VERSION=$(cat "$BUSYBOX_ARM64_DIR/version")
		;;
	*) die "unknown root file system flavour: $1" ;;
	esac
}

# busybox_arm64: finds Debian's busybox-static:arm64 binary in the cache or
# downloads the package (apt-get download, with arm64 added to dpkg's
# architectures only for that command and removed again, along with its
# package lists) and extracts the binary. Sets BUSYBOX_ARM64.
BUSYBOX_ARM64_DIR=$CACHE/busybox-arm64
download_busybox_arm64() {
	local tmp added=0 rc=0 deb
	# Under /tmp, which apt-get download's _apt user can enter (the cache may be under /root).
	tmp=$(mktemp -d /tmp/flick-busybox-arm64.XXXXXX)
	TMP_DIRS+=("$tmp")
	mkdir -p "$tmp/x"
	chmod 755 "$tmp"
	((EUID == 0)) || die "rootfs-arm64: downloading busybox-static:arm64 needs root (dpkg --add-architecture)"
	if ! dpkg --print-foreign-architectures | grep -qx arm64; then
		dpkg --add-architecture arm64 || die "rootfs-arm64: dpkg --add-architecture arm64 failed"
		added=1
	fi
	say "rootfs-arm64: apt-get download busybox-static:arm64 (arm64 added to dpkg for it)"
	{ apt-get update -q -o DPkg::Lock::Timeout=300 >&2 &&
		(cd "$tmp" && apt-get download -q busybox-static:arm64 >&2); } || rc=$?
	if ((added)); then
		dpkg --remove-architecture arm64 || true
		apt-get update -q -o DPkg::Lock::Timeout=300 >&2 || true
	fi
	((rc == 0)) || die "rootfs-arm64: cannot download busybox-static:arm64"
	deb=$(ls "$tmp"/busybox-static_*_arm64.deb 2>/dev/null | head -n1)
	[[ -n $deb ]] || die "rootfs-arm64: apt-get download left no busybox-static_*_arm64.deb"
	dpkg-deb -x "$deb" "$tmp/x"
	[[ -s $tmp/x/bin/busybox ]] || die "rootfs-arm64: the package has no /bin/busybox"
	local out=$CACHE/.tmp-busybox-arm64.$$
	TMP_DIRS+=("$out")
	rm -rf -- "$out"
	mkdir -p "$out"
	cp "$tmp/x/bin/busybox" "$out/busybox"
	dpkg-deb -f "$deb" Version >"$out/version"
	publish "$out" "$BUSYBOX_ARM64_DIR"
	rm -rf -- "$tmp"
}
busybox_arm64() {
	cached busybox-arm64 "$BUSYBOX_ARM64_DIR" "busybox version" download_busybox_arm64
	BUSYBOX_ARM64=$BUSYBOX_ARM64_DIR/busybox
	# The ELF header: 64-bit (byte 4 = 2), machine 183 (AArch64) at offset 18.
	[[ $(od -An -tx1 -j 4 -N1 "$BUSYBOX_ARM64" | tr -d ' ') == 02 &&
		$(od -An -tu2 -j 18 -N2 "$BUSYBOX_ARM64" | tr -d ' ') == 183 ]] ||
		die "rootfs-arm64: $BUSYBOX_ARM64 is not an arm64 ELF binary"
}

build_rootfs() {
	local dir=$1 key=$2 tmp root out a applets
	tmp=$CACHE/.tmp-$R_NAME-$key.$$
	TMP_DIRS+=("$tmp")
	rm -rf -- "$tmp"
	root=$tmp/root
	out=$tmp/out
	mkdir -p "$out" "$root"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,root,etc}
	chmod 1777 "$root/tmp"
	chmod 700 "$root/root"

	say "$R_NAME: busybox $R_BUSYBOX_VERSION"
	applets=$("${R_RUN[@]}" "$R_BUSYBOX" --list) || die "$R_NAME: cannot list the applets of $R_BUSYBOX"
	for a in sh mount devmem poweroff reboot setsid cttyhack cat echo grep wc sleep rm stty uname; do
		grep -qx "$a" <<<"$applets" || die "$R_NAME: $R_BUSYBOX has no '$a' applet"
	done
	cp "$R_BUSYBOX" "$root/bin/busybox"
	while IFS= read -r a; do
		case $a in "" | bin/busybox | sbin/init | linuxrc) continue ;; esac
		mkdir -p "$root/$(dirname "$a")"
		[[ -e $root/$a || -L $root/$a ]] || ln -s /bin/busybox "$root/$a"
	done < <("${R_RUN[@]}" "$R_BUSYBOX" --list-full)
	install -m 0755 "$INIT_SCRIPT" "$root/init"
	say "$R_NAME: /bin/flick-vsock (static, from $(basename "$VSOCK_SRC"), $R_CC)"
	"$R_CC" -static -O2 -Wall -Wextra -Werror -o "$root/bin/flick-vsock" "$VSOCK_SRC" ||
		die "$R_NAME: building flick-vsock failed"
	"$R_STRIP" "$root/bin/flick-vsock"
	ln -s ../init "$root/sbin/init"
	# The kernel opens /dev/console for init before anything mounts devtmpfs
	# when it boots from the initramfs.
	mknod -m 600 "$root/dev/console" c 5 1 ||
		say "$R_NAME: warning: cannot create /dev/console (not root?)"
	chown -R 0:0 "$root" 2>/dev/null || true

	say "$R_NAME: ext4 image (${ROOTFS_SIZE_MIB} MiB, label $ROOTFS_LABEL)"
	mkfs.ext4 -q -F -b 4096 -L "$ROOTFS_LABEL" -d "$root" "$out/rootfs.ext4" "${ROOTFS_SIZE_MIB}M" >/dev/null
	e2fsck -fn "$out/rootfs.ext4" >/dev/null 2>&1 || die "$R_NAME: e2fsck found errors in the new ext4 image"

	say "$R_NAME: uncompressed newc cpio initramfs"
	(cd "$root" && find . -mindepth 1 | LC_ALL=C sort |
		cpio --quiet -o -H newc -R 0:0 --reproducible) >"$out/initramfs.cpio"
	cpio --quiet -it <"$out/initramfs.cpio" | grep -qx init || die "$R_NAME: the initramfs has no /init"

	publish "$out" "$dir"
	rm -rf -- "$tmp"
}

# rootfs ARCH: builds or finds that root file system; sets ROOTFS_DIR.
rootfs() {
	local key dir
	rootfs_flavour "$1"
	key=$(
		{
			echo "$R_NAME"
			declare -f rootfs_flavour build_rootfs | sha256sum | cut -d' ' -f1
			echo "$ROOTFS_SIZE_MIB $ROOTFS_LABEL"
			sha256sum "$INIT_SCRIPT" "$VSOCK_SRC" "$R_BUSYBOX" | cut -d' ' -f1
			"$R_CC" -dumpfullversion
			echo "$R_BUSYBOX_VERSION"
			pkg_version e2fsprogs
			echo
			pkg_version cpio
			echo
		} | hash_inputs
	)
	dir=$CACHE/$R_NAME-$key
	cached "$R_NAME" "$dir" "rootfs.ext4 initramfs.cpio" build_rootfs "$dir" "$key"
	ROOTFS_DIR=$dir
}

KERNEL_FLAVOUR=$arch
[[ $arch == x86_64 ]] && KERNEL_FLAVOUR=x86
if ((want_kernel)); then kernel "$KERNEL_FLAVOUR"; fi
if ((want_rootfs)); then rootfs "$arch"; fi

case $arch in
x86_64)
	if ((want_kernel)); then
		echo "FLICK_KERNEL_VMLINUX=$KERNEL_DIR/vmlinux"
		echo "FLICK_KERNEL_BZIMAGE=$KERNEL_DIR/bzImage"
	fi
	if ((want_rootfs)); then
		echo "FLICK_ROOTFS_EXT4=$ROOTFS_DIR/rootfs.ext4"
		echo "FLICK_INITRAMFS=$ROOTFS_DIR/initramfs.cpio"
	fi
	;;
arm64)
	if ((want_kernel)); then echo "FLICK_KERNEL_ARM64_IMAGE=$KERNEL_DIR/Image"; fi
	if ((want_rootfs)); then
		echo "FLICK_ROOTFS_ARM64_EXT4=$ROOTFS_DIR/rootfs.ext4"
		echo "FLICK_INITRAMFS_ARM64=$ROOTFS_DIR/initramfs.cpio"
	fi
	;;
esac
