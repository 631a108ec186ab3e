#!/usr/bin/env bash
# Cold-boots the project's Linux guest with flick and reports how long it took to reach user
# space: vmlinux (PVH) with the ext4 root on virtio-blk, init's READY line, flick.init=reboot.
#
#   scripts/linux-boot-time.sh [--vcpus N] [--runs N] [--initramfs] [--init ACTION]
#
# One line per run: guest time of "Run /sbin/init" and of READY (the guest's clock), flick's
# Guest-boot-time line (wall and CPU time from the start of the VM to the boot-timer write
# init does just before READY), spawn-to-exit wall time, exit code, and the host's load
# average at the start (this machine is shared; on PVM hosts guest kernel code is emulated
# and the numbers move with the load). Uses the static release flick (scripts/build-release.sh)
# or $FLICK_BIN, and the cached guest artifacts (scripts/guest-artifacts.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

vcpus=1 runs=1 initramfs=0 init=reboot
while (($#)); do
    case $1 in
        --vcpus) vcpus=$2; shift ;;
        --runs) runs=$2; shift ;;
        --initramfs) initramfs=1 ;;
        --init) init=$2; shift ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "linux-boot-time.sh: unknown option $1" >&2; exit 2 ;;
    esac
    shift
done

eval "$(scripts/guest-artifacts.sh)"
flick=${FLICK_BIN:-$(scripts/build-release.sh)}
work=$(mktemp -d /tmp/flick-boot-time.XXXXXX)
trap 'rm -rf "$work"' EXIT

args="console=ttyS0 reboot=k panic=1 flick.init=$init"
for ((i = 1; i <= runs; i++)); do
    if ((initramfs)); then
        boot="\"kernel_image_path\": \"$FLICK_KERNEL_BZIMAGE\", \"initrd_path\": \"$FLICK_INITRAMFS\""
        drives="[]"
        run_init="Run /init"
    else
        cp "$FLICK_ROOTFS_EXT4" "$work/rootfs.ext4"
        boot="\"kernel_image_path\": \"$FLICK_KERNEL_VMLINUX\""
        drives="[{\"drive_id\": \"rootfs\", \"path_on_host\": \"$work/rootfs.ext4\",
                  \"is_root_device\": true, \"is_read_only\": false}]"
        run_init="Run /sbin/init"
    fi
    cat >"$work/vm.json" <<JSON
{"boot-source": {$boot, "boot_args": "$args"}, "drives": $drives,
 "machine-config": {"vcpu_count": $vcpus, "mem_size_mib": 256}}
JSON
    load=$(cut -d' ' -f1 /proc/loadavg)
    start=$(date +%s%N)
    set +e
    timeout 900 "$flick" --no-api --level Info --boot-timer --config-file "$work/vm.json" \
        </dev/null >"$work/console" 2>"$work/log"
    code=$?
    set -e
    end=$(date +%s%N)
    t_init=$(grep -m1 "$run_init as init process" "$work/console" | sed -n 's/^\[ *\([0-9.]*\)\].*/\1/p')
    t_ready=$(grep -m1 '^READY uptime=' "$work/console" | sed 's/.*uptime=//')
    boot=$(grep -m1 'Guest-boot-time' "$work/log" |
        sed -n 's/.*= *\([0-9]*\) us.*, *\([0-9]*\) CPU us.*/wall \1 us, CPU \2 us/p')
    printf 'run %d: vcpus=%d init=%ss READY=%ss boot-timer: %s; spawn-to-exit %d ms; exit %d; load %s\n' \
        "$i" "$vcpus" "${t_init:-?}" "${t_ready:-?}" "${boot:-none}" \
        $(((end - start) / 1000000)) "$code" "$load"
    if [[ $init == check ]]; then
        grep '^CHECK ' "$work/console" | sed 's/^/    /'
    fi
done
