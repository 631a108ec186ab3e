//! Snapshot create and load: capture a paused VM into a state file and a memory file, and build a
//! VM from them in a fresh process with guest RAM mapped privately from the memory file (pages
//! load lazily on first touch).

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::time::Instant;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{Bytes, FileOffset, GuestAddress};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::{self, GuestMemoryMmap, GuestRegionMmap};

use super::builder::{self, BuildContext, BuildError, Phases, RunningVm};
use super::registry::{Opened, Registry, RegistryError};
use super::uffd::{self, UffdError};
use crate::arch::{Arch, ArchError, Current};
use crate::config::{MemSource, SnapshotCreateConfig, SnapshotLoadConfig, SnapshotType};
use crate::devices::boot_timer::BootTimer;
use crate::devices::bus::{lock, Bus};
use crate::devices::legacy::SerialDevice;
use crate::devices::virtio::Overrides;
use crate::kvm::vcpu::{VcpuCommand, VcpuError, VcpuResponse};
use crate::snapshot::format::{saved_machine, VmSnapshot};
use crate::snapshot::{self, MemTrailer, SnapshotError};

const PAGE: usize = 4096;
const PAGE_I64: i64 = 4096;
const CHUNK: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotOpError {
    #[error(transparent)]
    File(#[from] SnapshotError),
    #[error(
        "a Diff snapshot needs dirty-page tracking: set track_dirty_pages in /machine-config before boot (or enable_diff_snapshots when loading a snapshot)"
    )]
    DiffNeedsTracking,
    #[error("cannot collect the guest's written pages")]
    DirtyLog(#[source] crate::kvm::vm::VmError),
    #[error(transparent)]
    BadParameters(#[from] crate::config::ConfigError),
    #[error("network_overrides: the snapshot has no interface \"{0}\"")]
    UnknownOverride(String),
    #[error("vsock_override: the snapshot has no vsock device")]
    NoVsock,
    #[error("the snapshot was taken on {0}; this flick runs {arch}", arch = Current::NAME)]
    WrongArch(String),
    #[error("cannot capture VM state")]
    Capture(#[source] ArchError),
    #[error("cannot capture vCPU state")]
    CaptureVcpu(#[source] VcpuError),
    #[error("cannot encode the snapshot")]
    Encode(#[source] serde_json::Error),
    #[error("cannot restore VM state")]
    Restore(#[source] ArchError),
    #[error("cannot restore the devices")]
    Devices(#[source] RegistryError),
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error("cannot map the memory file {0}")]
    Map(String, #[source] std::io::Error),
    #[error(transparent)]
    Uffd(#[from] UffdError),
}

impl SnapshotOpError {
    /// Whether the host rather than the request is at fault.
    pub fn is_internal(&self) -> bool {
        match self {
            SnapshotOpError::Capture(_)
            | SnapshotOpError::CaptureVcpu(_)
            | SnapshotOpError::Encode(_)
            | SnapshotOpError::DirtyLog(_)
            | SnapshotOpError::Restore(_) => true,
            SnapshotOpError::Devices(e) => e.is_internal(),
            SnapshotOpError::Build(e) => e.is_internal(),
            _ => false,
        }
    }
}

/// Writes guest RAM to `file`, leaving all-zero pages as holes, then the trailer.
/// The process's page map (`/proc/self/pagemap`): which pages of a mapping have ever been
/// given memory. Pages of an anonymous mapping that are neither present nor swapped out were
/// never touched and read as zeros, so a full snapshot need not read them; in a private file
/// mapping such pages read as the file. `None` where the file
/// cannot be opened (no `/proc`, as in some jails): then every page is read.
struct PageMap(Option<File>);

impl PageMap {
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;

    fn open() -> PageMap {
        PageMap(File::open("/proc/self/pagemap").ok())
    }

    /// For each of the `pages` pages from host address `host`: whether it may hold data (all
    /// `true` without a page map or when it cannot be read).
    fn touched(&self, host: u64, pages: usize, out: &mut Vec<bool>) {
        use std::os::unix::fs::FileExt;
        out.clear();
        let mut entries = vec![0u8; pages * 8];
        let read = self.0.as_ref().is_some_and(|f| {
            f.read_exact_at(&mut entries, host / PAGE as u64 * 8)
                .is_ok()
        });
        if !read {
            out.resize(pages, true);
            return;
        }
        out.extend(entries.chunks_exact(8).map(|e| {
            let entry = u64::from_le_bytes(e.try_into().unwrap_or_default());
            entry & (Self::PRESENT | Self::SWAPPED) != 0
        }));
    }
}

/// Marks in `out` the pages of `file` from `offset` that may hold data (are not in a hole):
/// one entry per page, `out.len()` pages. Marks every page if the file cannot tell.
fn mark_file_data(file: &File, offset: u64, out: &mut [bool]) {
    let pages = out.len();
    let end = offset + (pages * PAGE) as u64;
    let mut at = offset;
    loop {
        match snapshot::next_data_extent(file, at, end) {
            Ok(Some((data, hole))) => {
                let first = usize::try_from((data - offset) / PAGE as u64).unwrap_or(0);
                let last = usize::try_from((hole - offset).div_ceil(PAGE as u64)).unwrap_or(pages);
                out[first.min(pages)..last.min(pages)]
                    .iter_mut()
                    .for_each(|t| *t = true);
                at = hole.max(data + 1);
            }
            Ok(None) => return,
            Err(_) => {
                out.iter_mut().for_each(|t| *t = true);
                return;
            }
        }
    }
}

/// Writes the non-zero pages of `region` (`size` bytes of RAM at `start`) at the file's
/// position, seeking over zero ones (holes, which read back as zeros). With `use_pagemap`, pages
/// that were never touched, of anonymous memory or over a hole of the memory file a restored VM
/// maps, are known to be zero without reading them.
fn write_nonzero_pages(
    mem: &GuestMemoryMmap,
    region: &GuestRegionMmap,
    start: u64,
    size: u64,
    file: &mut File,
    buf: &mut [u8],
    use_pagemap: bool,
) -> std::io::Result<()> {
    let pagemap = if use_pagemap {
        PageMap::open()
    } else {
        PageMap(None)
    };
    let host = region.as_ptr() as u64;
    let mut touched = Vec::new();
    let mut done = 0u64;
    while done < size {
        let n = usize::try_from((size - done).min(buf.len() as u64)).unwrap_or(buf.len());
        pagemap.touched(host + done, n.div_ceil(PAGE), &mut touched);
        // A private file mapping (a restored snapshot): a page the process never mapped reads
        // as the file, so it may hold data where the file does.
        if let Some(backing) = region.file_offset() {
            let mut data = vec![false; touched.len()];
            mark_file_data(backing.file(), backing.start() + done, &mut data);
            for (t, d) in touched.iter_mut().zip(data) {
                *t |= d;
            }
        }
        if !touched.iter().any(|&t| t) {
            file.seek(SeekFrom::Current(i64::try_from(n).unwrap_or(i64::MAX)))?;
            done += n as u64;
            continue;
        }
        // Page by page: reading an untouched page would fault it in.
        for (i, &maybe) in touched.iter().enumerate() {
            let len = PAGE.min(n - i * PAGE);
            let page = &mut buf[..len];
            if maybe {
                mem.read_slice(page, GuestAddress(start + done + (i * PAGE) as u64))
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
            }
            if maybe && page.iter().any(|&b| b != 0) {
                file.write_all(page)?;
            } else {
                file.seek(SeekFrom::Current(i64::try_from(len).unwrap_or(PAGE_I64)))?;
            }
        }
        done += n as u64;
    }
    Ok(())
}

/// Writes the pages of `region` (`size` bytes of RAM at `start`) that its bitmap marks as
/// written, in runs, at their place from file offset `offset`; reads nothing else.
fn write_dirty_pages(
    mem: &GuestMemoryMmap,
    region: &GuestRegionMmap,
    start: u64,
    size: u64,
    offset: u64,
    file: &mut File,
    buf: &mut [u8],
) -> std::io::Result<()> {
    let pages = usize::try_from(size).map_err(std::io::Error::other)? / PAGE;
    let most = buf.len() / PAGE;
    let mut page = 0;
    while page < pages {
        if !memory::page_dirty(region, page * PAGE) {
            page += 1;
            continue;
        }
        let mut run = 1;
        while page + run < pages && run < most && memory::page_dirty(region, (page + run) * PAGE) {
            run += 1;
        }
        let at = (page * PAGE) as u64;
        let bytes = &mut buf[..run * PAGE];
        mem.read_slice(bytes, GuestAddress(start + at))
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        file.seek(SeekFrom::Start(offset + at))?;
        file.write_all(bytes)?;
        page += run;
    }
    Ok(())
}

/// Writes guest RAM into `file`, then the trailer. A full snapshot writes every page but the
/// zero ones (holes, which read back as zeros); a diff snapshot only the pages the regions'
/// bitmaps mark as written since the last snapshot, zero or not, at their place in the same
/// layout, and leaves holes everywhere else.
fn write_memory(
    mem: &GuestMemoryMmap,
    ram: &[(u64, u64)],
    file: &mut File,
    trailer: MemTrailer,
    pagemap: bool,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    let mut offset = 0u64;
    for &(start, size) in ram {
        let region = mem
            .find_region(GuestAddress(start))
            .filter(|r| r.start_addr().0 == start && r.len() == size)
            .ok_or_else(|| std::io::Error::other("guest RAM does not match its memory regions"))?;
        file.seek(SeekFrom::Start(offset))?;
        if trailer.diff {
            write_dirty_pages(mem, region, start, size, offset, file, &mut buf)?;
        } else {
            write_nonzero_pages(mem, region, start, size, file, &mut buf, pagemap)?;
        }
        offset += size;
    }
    file.set_len(offset)?;
    file.seek(SeekFrom::Start(offset))?;
    file.write_all(&snapshot::mem_trailer(MemTrailer {
        ram_bytes: offset,
        ..trailer
    }))?;
    file.sync_all()
}

/// Captures `vm` (paused) into the files named by `params`.
pub fn create(
    vm: &RunningVm,
    config: &crate::config::VmConfig,
    params: &SnapshotCreateConfig,
) -> Result<(), SnapshotOpError> {
    let diff = params.snapshot_type == SnapshotType::Diff;
    if diff && !vm.track_dirty {
        return Err(SnapshotOpError::DiffNeedsTracking);
    }
    let started = Instant::now();
    let context = Current::save_context(vm.vm.kvm()).map_err(SnapshotOpError::Capture)?;
    let mut vcpus = Vec::with_capacity(vm.vcpus.handles.len());
    for handle in &vm.vcpus.handles {
        let answer = handle.call(VcpuCommand::SaveState(context.clone()));
        match answer.map_err(SnapshotOpError::CaptureVcpu)? {
            VcpuResponse::State(Ok(state)) => vcpus.push(*state),
            VcpuResponse::State(Err(e)) => {
                let e = VcpuError::State(handle.index, e);
                return Err(SnapshotOpError::CaptureVcpu(e));
            }
            _ => {
                let e = VcpuError::UnexpectedAnswer(handle.index);
                return Err(SnapshotOpError::CaptureVcpu(e));
            }
        }
    }
    let (machine, boot) = saved_machine(config, vm.cpu_profile);
    let snapshot = VmSnapshot {
        snapshot_id: snapshot::new_snapshot_id(),
        arch: Current::NAME.to_string(),
        machine,
        boot,
        ram: vm.ram.clone(),
        vm: Current::save_vm(vm.vm.fd()).map_err(SnapshotOpError::Capture)?,
        vcpus,
        serial: lock(&vm.legacy.serial).snapshot(),
        devices: vm.devices.save(),
    };
    let payload = serde_json::to_vec(&snapshot).map_err(SnapshotOpError::Encode)?;
    // The guest's writes since the last snapshot (KVM's log, which the state capture above has
    // added to, as KVM writes guest memory for some of it) join the devices' writes in the
    // regions' bitmaps. They stay there until the files are written, so a failed attempt loses
    // none of them.
    if vm.track_dirty {
        vm.vm
            .collect_dirty_log(&vm.mem)
            .map_err(SnapshotOpError::DirtyLog)?;
    }

    let mem_path = Path::new(&params.mem_file_path);
    let mem_tmp = mem_path.with_extension("partial");
    let mem_name = mem_path.display().to_string();
    let trailer = MemTrailer {
        snapshot_id: snapshot.snapshot_id,
        ram_bytes: 0,
        diff,
    };
    let written = File::create(&mem_tmp)
        // Under a UFFD page server, a page the process never mapped is one the server has not
        // provided yet, not a zero page: every page is read.
        .and_then(|mut f| write_memory(&vm.mem, &vm.ram, &mut f, trailer, vm.uffd.is_none()))
        .and_then(|()| std::fs::rename(&mem_tmp, mem_path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&mem_tmp);
        return Err(SnapshotError::Write(mem_name, e).into());
    }
    snapshot::write_state_file(Path::new(&params.snapshot_path), &payload)?;
    // Both files are written: the next diff snapshot starts from this one.
    memory::reset_dirty(&vm.mem);
    tracing::info!(
        "{} snapshot created in {} us",
        if diff { "diff" } else { "full" },
        started.elapsed().as_micros()
    );
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
        let len = usize::try_from(size).map_err(|_| map_err(&"RAM range too large"))?;
        let region = MmapRegionBuilder::new(len)
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

/// Builds a VM from the snapshot named by `params`. vCPUs start paused unless `resume_vm`.
pub fn load(
    params: &SnapshotLoadConfig,
    ctx: BuildContext,
) -> Result<(RunningVm, VmSnapshot), SnapshotOpError> {
    let source = params.mem_source()?;
    let state_name = params.snapshot_path.clone();
    let payload = snapshot::read_state_file(Path::new(&params.snapshot_path))?;
    let snap: VmSnapshot = serde_json::from_slice(&payload)
        .map_err(|e| SnapshotError::Payload(state_name.clone(), e.to_string()))?;
    if snap.arch != Current::NAME {
        return Err(SnapshotOpError::WrongArch(snap.arch));
    }
    let mem_bytes = u64::try_from(snap.machine.mem_size_mib).unwrap_or(u64::MAX) << 20;
    if snap.ram != Current::ram_ranges(mem_bytes) || snap.ram_bytes().is_none() {
        return Err(SnapshotError::Payload(
            state_name,
            "guest RAM ranges do not match its memory size".into(),
        )
        .into());
    }
    let vcpu_count = snap.vcpus.len();
    if vcpu_count == 0 || vcpu_count != usize::from(snap.machine.vcpu_count) {
        return Err(SnapshotError::Payload(
            state_name,
            "vCPU count does not match its configuration".into(),
        )
        .into());
    }
    // The memory file is checked against the state file here; a UFFD page server holds its own
    // and is trusted to serve the right one.
    let mem_file = match source {
        MemSource::File(path) => {
            let file = File::open(path).map_err(|e| SnapshotError::Read(path.into(), e))?;
            snapshot::check_mem_file(
                &file,
                path,
                &state_name,
                snap.snapshot_id,
                snap.ram_bytes().unwrap_or(u64::MAX),
            )?;
            Some((file, path))
        }
        MemSource::Uffd(_) => None,
    };
    builder::check_memory(snap.machine.mem_size_mib)?;
    let taps: Vec<(String, String)> = params
        .network_overrides
        .iter()
        .map(|o| (o.iface_id.clone(), o.host_dev_name.clone()))
        .collect();
    for (id, _) in &taps {
        if !snap.devices.iter().any(|d| d.kind == "net" && &d.id == id) {
            return Err(SnapshotOpError::UnknownOverride(id.clone()));
        }
    }
    let vsock_uds_path = params.vsock_override.as_ref().map(|o| o.uds_path.as_str());
    if let Some(path) = vsock_uds_path {
        crate::config::validate_uds_path(path)?;
        if !snap.devices.iter().any(|d| d.kind == "vsock") {
            return Err(SnapshotOpError::NoVsock);
        }
    }
    let overrides = Overrides {
        taps: &taps,
        vsock_uds_path,
        mmds: Some(&ctx.mmds),
    };
    let opened = Opened::from_saved(&snap.devices, overrides).map_err(SnapshotOpError::Devices)?;

    let mut phases = Phases::new();
    let (mem, uffd) = match (mem_file, source) {
        (Some((file, path)), _) => (map_memory(&file, path, &snap.ram)?, None),
        (None, MemSource::Uffd(socket)) => {
            let (mem, backend) = uffd::guest_memory(&snap.ram, socket)?;
            (mem, Some(backend))
        }
        (None, MemSource::File(_)) => unreachable!("a memory file is opened above"),
    };
    phases.mark("map memory");
    let (vm, vcpu_fds) = builder::create_vm(
        &mem,
        snap.machine.vcpu_count,
        params.track_dirty(),
        &mut phases,
    )?;
    if !Current::RESTORE_VM_AFTER_VCPUS {
        Current::restore_vm(vm.fd(), &snap.vm).map_err(SnapshotOpError::Restore)?;
    }

    let mut mmio = Bus::new();
    let devices = Registry::attach(&vm, &mem, &mut mmio, opened).map_err(BuildError::from)?;
    devices
        .restore(&snap.devices)
        .map_err(SnapshotOpError::Devices)?;
    let timer = BootTimer::new(
        ctx.started,
        ctx.started_cpu_us,
        ctx.boot_times.clone(),
        false,
    );
    let serial_out = ctx.serial_out;
    let serial_snap = snap.serial.clone();
    let make_serial = Box::new(move |irq, drained| {
        SerialDevice::restored(&serial_snap, irq, drained, serial_out)
    });
    let (legacy, pio) = Current::legacy_devices(vm.fd(), &mut mmio, timer, make_serial)
        .map_err(BuildError::from)?;
    phases.mark("devices");

    let mut configured = Vec::with_capacity(vcpu_count);
    for (state, fd) in snap.vcpus.iter().zip(vcpu_fds) {
        let config = Current::restore_vcpu(&fd, state).map_err(SnapshotOpError::Restore)?;
        configured.push((fd, config));
    }
    if Current::RESTORE_VM_AFTER_VCPUS {
        Current::restore_vm(vm.fd(), &snap.vm).map_err(SnapshotOpError::Restore)?;
    }
    phases.mark("restore vCPUs");
    let vcpus = builder::start_vcpus(
        configured,
        &mem,
        (pio, mmio),
        !params.resume_vm,
        &legacy.stopping,
        ctx.vcpu_seccomp.as_ref(),
    )?;
    phases.mark("spawn vCPU threads");
    let running = RunningVm {
        vm,
        mem,
        ram: snap.ram.clone(),
        legacy,
        vcpus,
        cpu_profile: snap.cpu_profile(),
        devices,
        track_dirty: params.track_dirty(),
        uffd,
    };
    Ok((running, snap))
}
