//! Snapshot create and load: capture a paused VM into a state file and a memory file, and build a
//! VM from them in a fresh process with guest RAM mapped privately from the memory file (pages
//! load lazily on first touch).

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use super::attach::{self, Attached};
use super::builder::{self, BuildContext, BuildError, Phases, RunningVm};
use crate::config::{SnapshotCreateConfig, SnapshotLoadConfig, SnapshotType};
use crate::devices::boot_timer::BootTimer;
use crate::devices::bus::{lock, Bus};
use crate::devices::legacy::SerialDevice;
use crate::devices::virtio::mmio::{MmioTransport, TransportSnapshot};
use crate::devices::virtio::SharedVirtioDevice;
use crate::kvm::state::VmState;
use crate::kvm::vcpu::{VcpuCommand, VcpuResponse};
use crate::snapshot::state::VmSnapshot;
use crate::snapshot::{self, SnapshotError};

const PAGE: usize = 4096;
const CHUNK: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotOpError {
    #[error(transparent)]
    File(#[from] SnapshotError),
    #[error("{0}")]
    Refused(String),
    #[error("cannot capture VM state")]
    Capture(#[source] crate::kvm::state::StateError),
    #[error("cannot restore VM state")]
    Restore(#[source] crate::kvm::state::StateError),
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error("cannot map the memory file {0}")]
    Map(String, #[source] std::io::Error),
}

/// Writes guest RAM to `file`, leaving all-zero pages as holes, then the trailer.
fn write_memory(
    mem: &GuestMemoryMmap,
    ram: &[(u64, u64)],
    file: &mut File,
    id: u64,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    let mut offset = 0u64;
    for &(start, size) in ram {
        let mut done = 0u64;
        while done < size {
            let n = (size - done).min(CHUNK as u64) as usize;
            mem.read_slice(&mut buf[..n], GuestAddress(start + done))
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            for page in buf[..n].chunks(PAGE) {
                if page.iter().all(|&b| b == 0) {
                    file.seek(SeekFrom::Current(page.len() as i64))?;
                } else {
                    file.write_all(page)?;
                }
            }
            done += n as u64;
        }
        offset += size;
    }
    file.set_len(offset)?;
    file.seek(SeekFrom::Start(offset))?;
    file.write_all(&snapshot::mem_trailer(id, offset))?;
    file.sync_all()
}

/// Captures `vm` (paused) into the files named by `params`.
pub fn create(
    vm: &RunningVm,
    config: &crate::config::VmConfig,
    params: &SnapshotCreateConfig,
) -> Result<(), SnapshotOpError> {
    if params.snapshot_type == SnapshotType::Diff {
        return Err(SnapshotOpError::Refused(
            "Diff snapshots are not supported by flick yet".into(),
        ));
    }
    let started = Instant::now();
    let candidates = Arc::new(vm.vm.msr_candidates().map_err(SnapshotOpError::Capture)?);
    let mut vcpus = Vec::with_capacity(vm.vcpus.handles.len());
    for handle in &vm.vcpus.handles {
        match handle.call(VcpuCommand::SaveState(candidates.clone())) {
            Ok(VcpuResponse::State(Ok(state))) => vcpus.push(*state),
            Ok(VcpuResponse::State(Err(message))) | Err(message) => {
                return Err(SnapshotOpError::Refused(message))
            }
            Ok(other) => {
                return Err(SnapshotOpError::Refused(format!(
                    "unexpected vCPU answer {other:?}"
                )))
            }
        }
    }
    let snapshot = VmSnapshot {
        snapshot_id: snapshot::new_snapshot_id(),
        config: config.clone(),
        ram: vm.ram.clone(),
        cpu_profile: vm.cpu_profile,
        kvm: VmState::capture(vm.vm.fd()).map_err(SnapshotOpError::Capture)?,
        vcpus,
        serial: lock(&vm.legacy.serial).snapshot(),
        drives: vm
            .devices
            .drives
            .iter()
            .map(|d| (d.id.clone(), lock(&d.transport).snapshot()))
            .collect(),
        nets: vm
            .devices
            .nets
            .iter()
            .map(|n| (n.id.clone(), lock(&n.transport).snapshot()))
            .collect(),
    };
    let payload = serde_json::to_vec(&snapshot)
        .map_err(|e| SnapshotOpError::Refused(format!("cannot encode the snapshot: {e}")))?;

    let mem_path = Path::new(&params.mem_file_path);
    let mem_tmp = mem_path.with_extension("partial");
    let mem_name = mem_path.display().to_string();
    let written = File::create(&mem_tmp)
        .and_then(|mut f| write_memory(&vm.mem, &vm.ram, &mut f, snapshot.snapshot_id))
        .and_then(|()| std::fs::rename(&mem_tmp, mem_path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&mem_tmp);
        return Err(SnapshotError::Write(mem_name, e).into());
    }
    snapshot::write_state_file(Path::new(&params.snapshot_path), &payload)?;
    tracing::info!("snapshot created in {} us", started.elapsed().as_micros());
    Ok(())
}

/// Maps the memory file's RAM privately (copy-on-write, loaded on first touch).
fn map_memory(
    file: &File,
    path: &str,
    ram: &[(u64, u64)],
) -> Result<GuestMemoryMmap, SnapshotOpError> {
    let mut regions = Vec::with_capacity(ram.len());
    let mut offset = 0u64;
    for &(start, size) in ram {
        let map_err = |e: &dyn std::fmt::Display| {
            SnapshotOpError::Map(path.into(), std::io::Error::other(e.to_string()))
        };
        let clone = file
            .try_clone()
            .map_err(|e| SnapshotOpError::Map(path.into(), e))?;
        let region = MmapRegionBuilder::new(size as usize)
            .with_file_offset(FileOffset::new(clone, offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| map_err(&e))?;
        let region = GuestRegionMmap::new(region, GuestAddress(start))
            .ok_or_else(|| map_err(&"region does not fit the guest address space"))?;
        regions.push(region);
        offset += size;
    }
    GuestMemoryMmap::from_regions(regions)
        .map_err(|e| SnapshotOpError::Map(path.into(), std::io::Error::other(e.to_string())))
}

/// Restores each transport from its snapshot (matched by id, in slot order) and lets active
/// devices process requests the guest queued just before the snapshot.
fn restore_slots(
    state_name: &str,
    what: &str,
    slots: &[(
        &str,
        &Arc<std::sync::Mutex<MmioTransport>>,
        SharedVirtioDevice,
    )],
    snaps: &[(String, TransportSnapshot)],
) -> Result<(), SnapshotOpError> {
    if slots.len() != snaps.len() {
        let msg = format!("{what} list does not match its configuration");
        return Err(SnapshotError::Payload(state_name.into(), msg).into());
    }
    for ((id, transport, device), (snap_id, snap)) in slots.iter().zip(snaps) {
        if id != snap_id {
            let msg = format!("{what} {snap_id} is out of order");
            return Err(SnapshotError::Payload(state_name.into(), msg).into());
        }
        lock(transport)
            .restore(snap)
            .map_err(|e| SnapshotOpError::Refused(format!("{what} {id}: {e}")))?;
        let mut device = lock(device);
        if device.is_active() {
            for queue in 0..device.queue_max_sizes().len() {
                device.process_queue(queue);
            }
        }
    }
    Ok(())
}

/// Builds a VM from the snapshot named by `params`. vCPUs start paused unless `resume_vm`.
pub fn load(
    params: &SnapshotLoadConfig,
    ctx: BuildContext,
) -> Result<(RunningVm, VmSnapshot), SnapshotOpError> {
    let mem_path = params.mem_file().map_err(SnapshotOpError::Refused)?;
    let state_name = params.snapshot_path.clone();
    let payload = snapshot::read_state_file(Path::new(&params.snapshot_path))?;
    let snap: VmSnapshot = serde_json::from_slice(&payload)
        .map_err(|e| SnapshotError::Payload(state_name.clone(), e.to_string()))?;
    let vcpu_count = snap.vcpus.len();
    if vcpu_count == 0 || vcpu_count != usize::from(snap.config.machine_config.vcpu_count) {
        return Err(SnapshotError::Payload(
            state_name,
            "vCPU count does not match its configuration".into(),
        )
        .into());
    }
    let mem_file = File::open(mem_path).map_err(|e| SnapshotError::Read(mem_path.into(), e))?;
    snapshot::check_mem_file(
        &mem_file,
        mem_path,
        &state_name,
        snap.snapshot_id,
        snap.ram_bytes(),
    )?;
    builder::check_memory(snap.config.machine_config.mem_size_mib)?;
    let drives = attach::open_drives(&snap.config.drives).map_err(BuildError::from)?;
    let overrides: Vec<(String, String)> = params
        .network_overrides
        .iter()
        .map(|o| (o.iface_id.clone(), o.host_dev_name.clone()))
        .collect();
    for (id, _) in &overrides {
        if !snap
            .config
            .network_interfaces
            .iter()
            .any(|n| &n.iface_id == id)
        {
            return Err(SnapshotOpError::Refused(format!(
                "network_overrides: the snapshot has no interface {id:?}"
            )));
        }
    }
    let nets =
        attach::open_nets(&snap.config.network_interfaces, &overrides).map_err(BuildError::from)?;

    let mut phases = Phases::new();
    let mem = map_memory(&mem_file, mem_path, &snap.ram)?;
    phases.mark("map memory file");
    let vm = builder::create_vm(&mem, vcpu_count as u8, &mut phases)?;
    snap.kvm
        .restore(vm.fd())
        .map_err(SnapshotOpError::Restore)?;

    let mut mmio = Bus::new();
    let mut devices = Attached::default();
    attach::attach_drives(&vm, &mem, &mut mmio, &mut devices, drives).map_err(BuildError::from)?;
    attach::attach_nets(&vm, &mem, &mut mmio, &mut devices, nets).map_err(BuildError::from)?;
    let drive_slots: Vec<_> = devices
        .drives
        .iter()
        .map(|d| {
            (
                d.id.as_str(),
                &d.transport,
                d.device.clone() as SharedVirtioDevice,
            )
        })
        .collect();
    restore_slots(&state_name, "drive", &drive_slots, &snap.drives)?;
    let net_slots: Vec<_> = devices
        .nets
        .iter()
        .map(|n| {
            (
                n.id.as_str(),
                &n.transport,
                n.device.clone() as SharedVirtioDevice,
            )
        })
        .collect();
    restore_slots(&state_name, "network interface", &net_slots, &snap.nets)?;
    let timer = BootTimer::new(
        ctx.started,
        ctx.started_cpu_us,
        ctx.boot_times.clone(),
        false,
    );
    let serial_out = ctx.serial_out;
    let serial_snap = snap.serial.clone();
    let (legacy, pio) = builder::legacy_devices(&vm, &mut mmio, timer, |irq, drained| {
        SerialDevice::restored(&serial_snap, irq, drained, serial_out)
            .map_err(BuildError::SerialState)
    })?;
    phases.mark("devices");

    let mut configured = Vec::with_capacity(vcpu_count);
    for (index, state) in snap.vcpus.iter().enumerate() {
        let fd = vm.create_vcpu(index as u8).map_err(BuildError::from)?;
        state.restore(&fd).map_err(SnapshotOpError::Restore)?;
        let cpuid = kvm_bindings::CpuId::from_entries(&state.cpuid)
            .map_err(|_| SnapshotError::Payload(state_name.clone(), "invalid CPUID".into()))?;
        configured.push((fd, cpuid));
    }
    phases.mark("restore vCPUs");
    let vcpus = builder::start_vcpus(
        configured,
        &mem,
        pio,
        mmio,
        !params.resume_vm,
        &legacy.stopping,
    )?;
    phases.mark("spawn vCPU threads");
    let running = RunningVm {
        vm,
        mem,
        ram: snap.ram.clone(),
        legacy,
        vcpus,
        cpu_profile: snap.cpu_profile,
        devices,
    };
    Ok((running, snap))
}
