//! criterion micro-benchmarks of the VMM's hot paths: descriptor-chain parsing, block request
//! handling, MMIO register access and API request routing.
//!
//! `cargo bench --bench hot_paths`

use std::hint::black_box;
use std::sync::{Arc, Mutex};

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use flick::memory::GuestMemoryMmap;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use flick::devices::bus::BusDevice;
use flick::devices::rate_limiter::{RateLimiter, SavedLimits};
use flick::devices::virtio::block::{Backing, Block, SavedDrive};
use flick::devices::virtio::mmio::MmioTransport;
use flick::devices::virtio::Interrupt;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
}

fn block_device(tag: &str) -> Block {
    let path = std::env::temp_dir().join(format!("flick-hot-{tag}-{}", std::process::id()));
    std::fs::write(&path, vec![0x5au8; 1 << 20]).unwrap();
    let backing = Backing::open(path.to_str().unwrap(), false).unwrap();
    let _ = std::fs::remove_file(&path);
    let saved = SavedDrive {
        id: "bench".into(),
        path: path.to_str().unwrap().into(),
        read_only: false,
        root: false,
        partuuid: None,
        writeback: false,
        limits: SavedLimits::default(),
    };
    Block::new(saved, backing, RateLimiter::new(None).unwrap())
}

/// A block read request: 16-byte header, one 4 KiB data buffer, status byte.
fn read_request(mem: &GuestMemoryMmap) -> [Descriptor; 3] {
    mem.write_obj(0u32, GuestAddress(0x10_0000)).unwrap(); // VIRTIO_BLK_T_IN
    mem.write_obj(8u64, GuestAddress(0x10_0008)).unwrap(); // sector 8
    [
        Descriptor::new(0x10_0000, 16, F_NEXT, 1),
        Descriptor::new(0x20_0000, 4096, F_NEXT | F_WRITE, 2),
        Descriptor::new(0x30_0000, 1, F_WRITE, 0),
    ]
}

fn descriptor_chain(c: &mut Criterion) {
    let mem = memory();
    let descs = read_request(&mem).map(RawDescriptor::from);
    c.bench_function("descriptor chain: pop and walk a 3-descriptor chain", |b| {
        b.iter_batched(
            || {
                let mock = MockSplitQueue::new(&mem, 256);
                mock.add_desc_chains(&descs, 0).unwrap();
                mock.create_queue::<Queue>().unwrap()
            },
            |mut queue| {
                let chain = queue.pop_descriptor_chain(&mem).unwrap();
                black_box(chain.collect::<Vec<Descriptor>>())
            },
            BatchSize::SmallInput,
        )
    });
}

fn block_request(c: &mut Criterion) {
    let mem = memory();
    let descs = read_request(&mem);
    let mut block = block_device("blk");
    c.bench_function("virtio-blk: decode and serve a 4 KiB read", |b| {
        b.iter(|| black_box(block.execute(&mem, black_box(&descs))))
    });
}

fn mmio_registers(c: &mut Criterion) {
    let device = Arc::new(Mutex::new(block_device("mmio")));
    let irq = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    let activate = EventFd::new(EFD_NONBLOCK).unwrap();
    let mut transport = MmioTransport::new(device, memory(), irq, activate);
    c.bench_function("virtio-mmio: read the status register", |b| {
        b.iter(|| {
            let mut data = [0u8; 4];
            transport.read(black_box(0x70), &mut data);
            black_box(data)
        })
    });
    c.bench_function("virtio-mmio: read 8 bytes of config space", |b| {
        b.iter(|| {
            let mut data = [0u8; 8];
            transport.read(black_box(0x100), &mut data);
            black_box(data)
        })
    });
}

fn api_routing(c: &mut Criterion) {
    let drive = br#"{"drive_id": "rootfs", "path_on_host": "/var/lib/rootfs.ext4",
                     "is_root_device": true, "is_read_only": false}"#;
    c.bench_function("API: route PUT /drives/rootfs", |b| {
        b.iter(|| {
            black_box(flick::api::routes::route(
                "PUT",
                "/drives/rootfs",
                black_box(drive),
            ))
        })
    });
    c.bench_function("API: route GET /", |b| {
        b.iter(|| black_box(flick::api::routes::route("GET", black_box("/"), b"")))
    });
}

criterion_group!(
    benches,
    descriptor_chain,
    block_request,
    mmio_registers,
    api_routing
);
criterion_main!(benches);
