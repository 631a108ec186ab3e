#!/usr/bin/env bash
# Checks the module layering of src/ (see src/lib.rs): which folders may import which.
# Prints each violation and exits 1 if there is any.
set -euo pipefail
cd "$(dirname "$0")/.."

bad=0
# forbid DIR PATTERN WHY: no file under DIR may mention the module path PATTERN.
forbid() {
	local dir=$1 pattern=$2 why=$3 hits
	hits=$(grep -rnE "$pattern" "$dir" --include='*.rs' || true)
	if [[ -n $hits ]]; then
		printf 'layering: %s\n%s\n' "$why" "$hits" >&2
		bad=1
	fi
}

forbid src/devices 'crate::(api|vmm|kvm|arch|snapshot)\b' "devices never import api, vmm, kvm, arch or snapshot"
forbid src/api 'crate::(kvm|devices|vmm|arch|snapshot)\b' "api never imports kvm, devices, vmm, arch or snapshot"
forbid src/arch 'crate::(api|vmm|kvm|snapshot)\b' "arch never imports api, vmm, kvm or snapshot"
forbid src/kvm 'crate::(api|vmm|snapshot)\b|arch::x86_64' "kvm never imports api, vmm, snapshot or a concrete architecture"
forbid src/vmm 'crate::api\b|arch::x86_64' "vmm never imports api or a concrete architecture"
forbid src/snapshot 'crate::(api|vmm)\b|arch::x86_64' "snapshot never imports api, vmm or a concrete architecture"
forbid src/mmds 'crate::(api|vmm|kvm|arch|snapshot|devices|control)\b' "mmds imports only config and logger"
forbid src/config.rs 'crate::' "config imports nothing of the crate"
forbid src/metrics.rs 'crate::' "metrics imports nothing of the crate"
forbid src/seccomp.rs 'crate::' "seccomp imports nothing of the crate"
forbid src/memory.rs 'crate::' "memory imports nothing of the crate"
forbid src/bin/flick-jailer '\bflick::' "the jailer imports nothing of flick's library (std, libc, thiserror only)"

if ((bad)); then
	exit 1
fi
echo "layering: ok" >&2
