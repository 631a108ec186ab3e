//! The virtio-mmio register file driven by a hostile driver: arbitrary reads and writes (any
//! offset, any access size, any value) through the MMIO bus to a transport in front of a real
//! device (a drive or a network interface on a fake backend), interleaved with what the VMM
//! thread does in response (applying resets and activations, processing queue notifications)
//! and with snapshots of the transport restored in place.
//!
//! Layout: flags, bus base (u64), op count, ops (op byte, offset u16, value u64), then guest
//! memory (so queues the driver sets up point at input-controlled rings).
#![no_main]

mod common;

use std::sync::{Arc, Mutex};

use common::{guest_memory, FakeBackend, Input};
use flick::devices::bus::{Bus, BusDevice};
use flick::devices::rate_limiter::RateLimiter;
use flick::devices::virtio::mmio::MmioTransport;
use flick::devices::virtio::SharedVirtioDevice;
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Size of one virtio-mmio slot.
const SLOT: u64 = 0x1000;

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let flags = input.u8();
    let base = input.u64();
    let count = usize::from(input.u8());
    let ops = input.bytes(count * 11).to_vec();
    let mem = guest_memory(input.bytes(usize::MAX));

    let limiter = || RateLimiter::new(None).expect("timerfd");
    let device: SharedVirtioDevice = if flags & 1 == 0 {
        Arc::new(Mutex::new(common::block(flags & 2 != 0, true, limiter())))
    } else {
        let net = common::net(
            FakeBackend::default(),
            flags & 2 != 0,
            (limiter(), limiter()),
        );
        Arc::new(Mutex::new(net))
    };
    let activate_evt = EventFd::new(EFD_NONBLOCK).expect("eventfd");
    let transport = MmioTransport::new(
        device.clone(),
        mem,
        common::interrupt(),
        activate_evt.try_clone().expect("eventfd"),
    );
    let transport = Arc::new(Mutex::new(transport));
    let mut bus = Bus::new();
    // The slot sits where the input says, when that is a valid range.
    let base = if bus.insert(transport.clone(), base, SLOT).is_ok() {
        base
    } else {
        bus.insert(transport.clone(), 0, SLOT).expect("slot at 0");
        0
    };

    let mut ops = Input(&ops);
    while !ops.is_empty() {
        let op = ops.u8();
        let offset = u64::from(ops.u16());
        let value = ops.u64();
        let size = usize::from(op >> 4) % 9;
        // Offsets mostly inside the slot, sometimes anywhere near it (or wrapping past it).
        let addr = if op & 8 != 0 {
            base.wrapping_add(value)
        } else {
            base.wrapping_add(offset % (SLOT + 8))
        };
        match op & 7 {
            0 | 1 => {
                let bytes = value.to_le_bytes();
                let _ = bus.write(addr, &bytes[..size]);
            }
            2 => {
                let mut buf = [0u8; 8];
                let _ = bus.read(addr, &mut buf[..size]);
            }
            3 => {
                // The transport called directly, as the bus would with this offset.
                let mut guard = transport.lock().unwrap();
                let bytes = value.to_le_bytes();
                guard.write(offset, &bytes[..size]);
                let mut buf = [0u8; 8];
                guard.read(offset, &mut buf[..size]);
            }
            4 => {
                // The VMM thread wakes on the activation eventfd.
                if activate_evt.read().is_ok() {
                    let _ = transport.lock().unwrap().sync_device();
                }
            }
            5 => {
                // A queue notification (ioeventfd) reaches the VMM thread.
                let mut device = device.lock().unwrap();
                if device.is_active() {
                    device.process_queue(usize::from(op % 3));
                }
            }
            6 => {
                let mut t = transport.lock().unwrap();
                let snap = t.snapshot();
                let _ = t.restore(&snap);
            }
            _ => {
                let mut t = transport.lock().unwrap();
                t.notify_config_change();
            }
        }
    }
});
