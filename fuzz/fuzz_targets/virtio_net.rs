//! virtio-net queues from a hostile driver, on a fake backend.
//!
//! The receive and transmit queues are set up from the input (sizes, ring addresses, event-idx)
//! with guest memory filled from the input; frames arriving from the backend are cut from the
//! input too. Then a sequence of events from the input: receive-queue and transmit-queue
//! notifications, a frame arriving, a save/restore of the device state, a reset and
//! re-activation. Optional tight rate limiters exercise throttling and rewinding.
//!
//! Layout: flags, acked offloads (2), rx limiter (3), tx limiter (3), rx queue (15), tx queue
//! (15), frame count, frames (u16 length each, then bytes), event count and events, then guest
//! memory.
#![no_main]

mod common;

use common::{guest_memory, FakeBackend, Input};
use flick::devices::virtio::{Activation, VirtioDevice, VIRTIO_F_VERSION_1};
use libfuzzer_sys::fuzz_target;
use virtio_queue::Queue;
use flick::memory::GuestMemoryMmap;

/// Offload features a driver may ack (CSUM, GUEST_CSUM, GUEST_TSO4/6, GUEST_UFO).
const OFFLOADS: u64 = 1 | 1 << 1 | 1 << 7 | 1 << 8 | 1 << 10;

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let flags = input.u8();
    let input_acked = input.u16();
    let limiters = (common::limiter(&mut input), common::limiter(&mut input));
    let mut queues_in = Input(input.bytes(30));
    let mut backend = FakeBackend {
        fail_writes: flags & 2 != 0,
        ..FakeBackend::default()
    };
    let frames = input.u8() % 8;
    for _ in 0..frames {
        let len = usize::from(input.u16());
        // Most frames are small; a length with the top bit set asks for a large one of zeros.
        let frame = if len & 0x8000 != 0 {
            vec![0u8; (len & 0x7fff) * 4]
        } else {
            input.bytes(len).to_vec()
        };
        backend.incoming.push_back(frame);
    }
    let count = usize::from(input.u8() % 16);
    let events = input.bytes(count).to_vec();
    let mem = guest_memory(input.bytes(usize::MAX));

    let mut net = common::net(backend, flags & 1 != 0, limiters);
    let max = net.queue_max_sizes().to_vec();
    let Some(rx) = common::queue_from(&mut queues_in, max[0], &mem) else {
        return;
    };
    let Some(tx) = common::queue_from(&mut queues_in, max[1], &mem) else {
        return;
    };
    let acked = VIRTIO_F_VERSION_1 | (u64::from(input_acked) & OFFLOADS);
    net.activate(activation(&mem, vec![copy(&rx), copy(&tx)], acked))
        .expect("two queues");
    let mut saved = false;
    for event in events {
        match event % 6 {
            0 => net.process_queue(0),
            1 => net.process_queue(1),
            // Once per input: hex-encoding a held 64 KiB frame is slow under instrumentation.
            3 if !saved => {
                saved = true;
                let state = net.save_state();
                net.restore_state(&state).expect("own state restores");
            }
            // A notification for a queue the device does not have (or any queue).
            _ if event % 6 < 4 => net.process_queue(usize::from(event)),
            4 => {
                net.reset();
                net.activate(activation(&mem, vec![copy(&rx), copy(&tx)], acked))
                    .expect("two queues");
            }
            // The backend's fd became readable (the fake's fd is -1).
            _ => net.process_fd(-1),
        }
    }
    let _ = net.queue_states();
    let mut samples = Vec::new();
    net.metrics(&mut samples);
    net.reset();
});

/// The same queue again, as the transport hands its queues over on each activation.
fn copy(queue: &Queue) -> Queue {
    Queue::try_from(queue.state()).expect("a valid queue's state")
}

fn activation(mem: &GuestMemoryMmap, queues: Vec<Queue>, acked: u64) -> Activation {
    Activation {
        mem: mem.clone(),
        queues,
        acked_features: acked,
        interrupt: common::interrupt(),
    }
}
