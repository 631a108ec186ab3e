//! The snapshot state-file parser: `snapshot::decode_state` (magic, version, length, CRC) on
//! arbitrary bytes, then serde_json into `snapshot::format::VmSnapshot` and the checks and
//! derivations the loader makes before it touches KVM or opens a file (architecture, vCPU
//! count, RAM size, queue states, device settings into the reported configuration).
//!
//! A CRC over fuzzer-made bytes is seldom right, so byte 0 bit 0 set means "the rest is a
//! payload": it is framed with a valid header first (the JSON parser gets fuzzed either way).
#![no_main]

use flick::arch::{Arch, Current};
use flick::config::VmConfig;
use flick::devices::virtio::KINDS;
use flick::snapshot::format::VmSnapshot;
use flick::snapshot::{decode_state, encode_state};
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueState};

fuzz_target!(|data: &[u8]| {
    let [mode, rest @ ..] = data else {
        return;
    };
    let framed;
    let file = if mode & 1 != 0 {
        framed = encode_state(rest);
        &framed[..]
    } else {
        rest
    };
    let Ok(payload) = decode_state("fuzz.state", file) else {
        return;
    };
    let Ok(snap) = serde_json::from_slice::<VmSnapshot>(payload) else {
        return;
    };
    // The loader's checks, in its order: what passes them is used further.
    if snap.arch != Current::NAME {
        return;
    }
    let vcpus = snap.vcpus.len();
    if vcpus == 0 || vcpus != usize::from(snap.machine.vcpu_count) {
        return;
    }
    let _ = snap.ram_bytes();
    let _ = snap.cpu_profile();
    let mut config: VmConfig = snap.base_config();
    for device in &snap.devices {
        for queue in &device.transport.queues {
            let _ = Queue::try_from(QueueState::from(queue));
        }
        if let Some(kind) = KINDS.iter().find(|k| k.name == device.kind) {
            let _ = (kind.describe)(&device.config, &mut config);
        }
    }
    let _ = serde_json::to_string(&config);
});
