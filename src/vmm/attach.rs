//! Attaching virtio devices to a VM being built: backing files, MMIO slots, IRQs, ioeventfds and
//! the kernel command line entries that announce them.

use std::sync::{Arc, Mutex};

use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::current::layout::{mmio_slot, FIRST_DEVICE_IRQ, LAST_DEVICE_IRQ, MMIO_SLOT_SIZE};
use crate::config::NetConfig;
use crate::config::{CacheType, DriveConfig};
use crate::devices::bus::Bus;
use crate::devices::rate_limiter::RateLimiter;
use crate::devices::tap::{Tap, TapError};
use crate::devices::virtio::block::{Backing, Block, BlockError};
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::net::Net;
use crate::devices::virtio::{Interrupt, SharedVirtioDevice, VirtioSlot};
use crate::kvm::vm::{Vm, VmError};

/// Offset of QueueNotify in the virtio-mmio register file.
const QUEUE_NOTIFY: u64 = 0x50;

#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("drive {0}")]
    Drive(String, #[source] BlockError),
    #[error("network interface {0}")]
    Net(String, #[source] TapError),
    #[error("network interface {0}: {1}")]
    NetConfig(String, String),
    #[error("too many devices: no IRQ left for device {0}")]
    NoIrq(usize),
    #[error(transparent)]
    Kvm(#[from] VmError),
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("device layout conflict")]
    Bus(#[source] crate::devices::bus::BusError),
}

/// A drive whose backing file is open, before the VM exists.
#[derive(Debug)]
pub struct OpenDrive {
    pub config: DriveConfig,
    pub backing: Backing,
}

/// Opens every drive's backing file, root device first (so it becomes `/dev/vda`).
pub fn open_drives(drives: &[DriveConfig]) -> Result<Vec<OpenDrive>, AttachError> {
    let mut ordered: Vec<&DriveConfig> = drives.iter().filter(|d| d.is_root_device).collect();
    ordered.extend(drives.iter().filter(|d| !d.is_root_device));
    ordered
        .into_iter()
        .map(|config| {
            let backing = Backing::open(&config.path_on_host, config.is_read_only)
                .map_err(|e| AttachError::Drive(config.drive_id.clone(), e))?;
            Ok(OpenDrive {
                config: config.clone(),
                backing,
            })
        })
        .collect()
}

/// A drive attached to a VM.
pub struct AttachedDrive {
    pub id: String,
    pub device: Arc<Mutex<Block>>,
    pub transport: Arc<Mutex<MmioTransport>>,
}

/// A network interface whose TAP is open, before the VM exists.
#[derive(Debug)]
pub struct OpenNet {
    pub config: NetConfig,
    pub tap: Tap,
}

/// Opens every interface's TAP; `overrides` retargets interfaces to other TAPs (snapshot load).
pub fn open_nets(
    nets: &[NetConfig],
    overrides: &[(String, String)],
) -> Result<Vec<OpenNet>, AttachError> {
    nets.iter()
        .map(|config| {
            let mut config = config.clone();
            if let Some((_, tap)) = overrides.iter().find(|(id, _)| *id == config.iface_id) {
                config.host_dev_name = tap.clone();
            }
            config
                .validate()
                .map_err(|e| AttachError::NetConfig(config.iface_id.clone(), e.to_string()))?;
            let tap = Tap::open(&config.host_dev_name)
                .map_err(|e| AttachError::Net(config.iface_id.clone(), e))?;
            Ok(OpenNet { config, tap })
        })
        .collect()
}

/// A network interface attached to a VM.
pub struct AttachedNet {
    pub id: String,
    pub device: Arc<Mutex<Net>>,
    pub transport: Arc<Mutex<MmioTransport>>,
}

/// Everything the VMM keeps of the attached devices.
#[derive(Default)]
pub struct Attached {
    pub drives: Vec<AttachedDrive>,
    pub nets: Vec<AttachedNet>,
    /// Event-loop subscribers to register once the VM runs.
    pub slots: Vec<VirtioSlot>,
    /// `virtio_mmio.device=` and `root=` entries for the kernel command line.
    pub cmdline: Vec<String>,
}

fn eventfd() -> Result<EventFd, AttachError> {
    EventFd::new(EFD_NONBLOCK).map_err(AttachError::EventFd)
}

/// Puts `device` in the next free slot: bus range, IRQ, notify ioeventfds, activation eventfd.
fn attach_device(
    vm: &Vm,
    mem: &GuestMemoryMmap,
    mmio: &mut Bus,
    attached: &mut Attached,
    device: SharedVirtioDevice,
) -> Result<Arc<Mutex<MmioTransport>>, AttachError> {
    let index = attached.slots.len();
    let irq = FIRST_DEVICE_IRQ + index as u32;
    if irq > LAST_DEVICE_IRQ {
        return Err(AttachError::NoIrq(index));
    }
    let base = mmio_slot(index as u64);
    let irqfd = eventfd()?;
    vm.register_irqfd(&irqfd, irq)?;
    let queue_count = crate::devices::bus::lock(&device).queue_max_sizes().len();
    let mut queue_evts = Vec::with_capacity(queue_count);
    for queue in 0..queue_count {
        let evt = eventfd()?;
        vm.register_mmio_notify(&evt, base + QUEUE_NOTIFY, queue as u32)?;
        queue_evts.push(evt);
    }
    let activate = eventfd()?;
    let transport = Arc::new(Mutex::new(MmioTransport::new(
        device.clone(),
        mem.clone(),
        Arc::new(Interrupt::new(irqfd)),
        activate.try_clone().map_err(AttachError::EventFd)?,
    )));
    mmio.insert(transport.clone(), base, MMIO_SLOT_SIZE)
        .map_err(AttachError::Bus)?;
    attached.slots.push(VirtioSlot::new(
        transport.clone(),
        device,
        activate,
        queue_evts,
    ));
    attached
        .cmdline
        .push(format!("virtio_mmio.device=4K@{base:#x}:{irq}"));
    Ok(transport)
}

/// Attaches the opened drives as virtio-blk devices.
pub fn attach_drives(
    vm: &Vm,
    mem: &GuestMemoryMmap,
    mmio: &mut Bus,
    attached: &mut Attached,
    drives: Vec<OpenDrive>,
) -> Result<(), AttachError> {
    for (n, drive) in drives.into_iter().enumerate() {
        let config = drive.config;
        if config.is_root_device {
            let root = match &config.partuuid {
                Some(uuid) => format!("root=PARTUUID={uuid}"),
                None => format!("root=/dev/vd{}", (b'a' + n as u8) as char),
            };
            attached.cmdline.push(root);
            attached
                .cmdline
                .push(if config.is_read_only { "ro" } else { "rw" }.into());
        }
        let writeback = config.cache_type == CacheType::Writeback;
        let limiter =
            RateLimiter::new(config.rate_limiter.as_ref()).map_err(AttachError::EventFd)?;
        let block = Block::new(config.drive_id.clone(), drive.backing, writeback, limiter);
        let block = Arc::new(Mutex::new(block));
        let transport = attach_device(vm, mem, mmio, attached, block.clone())?;
        attached.drives.push(AttachedDrive {
            id: config.drive_id,
            device: block,
            transport,
        });
    }
    Ok(())
}

/// Attaches the opened interfaces as virtio-net devices (after the drives).
pub fn attach_nets(
    vm: &Vm,
    mem: &GuestMemoryMmap,
    mmio: &mut Bus,
    attached: &mut Attached,
    nets: Vec<OpenNet>,
) -> Result<(), AttachError> {
    for net in nets {
        let config = net.config;
        let id = config.iface_id.clone();
        let mac = match &config.guest_mac {
            Some(mac) => Some(
                crate::config::parse_mac(mac)
                    .map_err(|e| AttachError::NetConfig(id.clone(), e.to_string()))?,
            ),
            None => None,
        };
        let rx = RateLimiter::new(config.rx_rate_limiter.as_ref()).map_err(AttachError::EventFd)?;
        let tx = RateLimiter::new(config.tx_rate_limiter.as_ref()).map_err(AttachError::EventFd)?;
        let device = Arc::new(Mutex::new(Net::new(
            id.clone(),
            net.tap,
            mac,
            config.mtu,
            (rx, tx),
        )));
        let transport = attach_device(vm, mem, mmio, attached, device.clone())?;
        attached.nets.push(AttachedNet {
            id,
            device,
            transport,
        });
    }
    Ok(())
}
