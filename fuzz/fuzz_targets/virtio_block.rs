//! virtio-blk requests from a hostile driver.
//!
//! Two modes, picked by byte 0 bit 0:
//! - execute: `Block::execute` on a descriptor chain taken from the input as-is (any addresses,
//!   lengths and flags, including shapes a split queue would never hand over);
//! - queue: a whole request queue set up from the input (size, ring addresses, ring and
//!   descriptor contents in guest memory), processed as after a guest notification, with an
//!   optional tight rate limiter.
//!
//! Byte 0 bit 1 makes the drive read-only, bit 2 turns writeback (flush) on. The input's tail
//! is copied into guest memory, so headers, rings and buffers are all guest-controlled.
#![no_main]

mod common;

use common::{guest_memory, Input, DRIVE_SECTORS};
use flick::devices::rate_limiter::RateLimiter;
use flick::devices::virtio::block::SECTOR_SIZE;
use flick::devices::virtio::{Activation, VirtioDevice, VIRTIO_F_VERSION_1};
use libfuzzer_sys::fuzz_target;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress};

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let flags = input.u8();
    let read_only = flags & 2 != 0;
    let writeback = flags & 4 != 0;
    if flags & 1 == 0 {
        execute(&mut input, read_only, writeback);
    } else {
        queue(&mut input, read_only, writeback);
    }
});

fn execute(input: &mut Input<'_>, read_only: bool, writeback: bool) {
    let count = usize::from(input.u8() % 8);
    let descs: Vec<Descriptor> = (0..count)
        .map(|_| {
            let addr = input.addr();
            let len = input.u32();
            let flags = u16::from(input.u8());
            Descriptor::new(addr, len, flags, 0)
        })
        .collect();
    let mem = guest_memory(input.bytes(usize::MAX));
    let mut block = common::block(
        read_only,
        writeback,
        RateLimiter::new(None).expect("timerfd"),
    );
    let completion = block.execute(&mem, &descs);

    // What the device may report: a status only if the chain ended in a writable byte inside
    // guest memory, a used length no larger than the writable bytes it was given.
    let writable: u64 = descs
        .iter()
        .filter(|d| d.is_write_only())
        .map(|d| u64::from(d.len()))
        .sum();
    assert!(u64::from(completion.used_len) <= writable.max(1));
    match completion.status {
        Some(status) => {
            let last = descs.last().expect("a status needs a descriptor");
            let written: u8 = mem.read_obj(last.addr()).expect("status byte in memory");
            assert_eq!(written, status);
            assert!(status <= 2);
            assert!(completion.used_len >= 1);
        }
        None => assert_eq!(completion.used_len, 0),
    }
    let max_bytes = DRIVE_SECTORS * SECTOR_SIZE;
    let stats = &block.stats;
    use std::sync::atomic::Ordering::Relaxed;
    assert!(stats.read_bytes.load(Relaxed) <= max_bytes);
    assert!(stats.write_bytes.load(Relaxed) <= max_bytes);
    if read_only {
        assert_eq!(stats.write_ops.load(Relaxed), 0);
    }
}

fn queue(input: &mut Input<'_>, read_only: bool, writeback: bool) {
    let limiter = common::limiter(input);
    let rounds = 1 + input.u8() % 3;
    // The queue is set up before memory is filled: its fields come first in the input.
    let mut header = Input(input.bytes(15));
    let mem = guest_memory(input.bytes(usize::MAX));
    let mut block = common::block(read_only, writeback, limiter);
    let max = block.queue_max_sizes()[0];
    let Some(queue) = common::queue_from(&mut header, max, &mem) else {
        return;
    };
    let activation = Activation {
        mem: mem.clone(),
        queues: vec![queue],
        acked_features: VIRTIO_F_VERSION_1,
        interrupt: common::interrupt(),
    };
    block.activate(activation).expect("one queue");
    for _ in 0..rounds {
        block.process_queue(0);
    }
    let _ = block.queue_states();
    let state = block.save_state();
    block.restore_state(&state).expect("own state restores");
    block.reset();
    // Guest memory outside RAM was never touched: reading the hole still fails.
    assert!(mem.read_obj::<u8>(GuestAddress(0x8000)).is_err());
}
