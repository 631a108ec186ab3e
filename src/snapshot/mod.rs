//! Snapshot files: a versioned, checksummed state file (JSON payload) and a memory file holding
//! guest RAM followed by a one-page trailer that ties it to its state file.
//!
//! State file layout: magic `FLICKSNP` (8 bytes), format version (u32 LE), payload length (u64
//! LE), CRC-32 of the payload (u32 LE), payload (JSON). Memory file: guest RAM regions back to
//! back, then a 4 KiB trailer: magic `FLICKMEM`, format version, snapshot id (u64), RAM bytes
//! (u64), kind (u8: 0 full, 1 diff). A diff memory file has the same layout but holds only the
//! pages written since the snapshot before it (holes elsewhere); merged onto that snapshot's
//! memory file (`flick-rebase-snap`) it becomes a full one. Pure I/O and format checks; the VMM
//! builds and applies the state.

pub mod format;

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;

const STATE_MAGIC: &[u8; 8] = b"FLICKSNP";
const MEM_MAGIC: &[u8; 8] = b"FLICKMEM";
/// Bumped whenever the state layout changes incompatibly. Version 1 (flick 0.1 before the device
/// registry) stored the API's configuration types and crate-serialized KVM structures.
pub const FORMAT_VERSION: u32 = 2;
const HEADER_BYTES: usize = 8 + 4 + 8 + 4;
/// Size of the memory file's trailer.
pub const MEM_TRAILER_BYTES: u64 = 4096;
const TRAILER_LEN: usize = 4096;
/// Largest state payload accepted (a sanity bound against corrupted lengths).
const MAX_PAYLOAD_BYTES: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("cannot read {0}")]
    Read(String, #[source] std::io::Error),
    #[error("cannot write {0}")]
    Write(String, #[source] std::io::Error),
    #[error("{0} is not a flick snapshot state file")]
    NotAState(String),
    #[error(
        "{path} has snapshot format version {found}; this flick reads version {FORMAT_VERSION} (take the snapshot again with this flick)"
    )]
    Version { path: String, found: u32 },
    #[error("{0} is truncated")]
    Truncated(String),
    #[error("{0} is corrupted (checksum mismatch)")]
    Checksum(String),
    #[error("{0} has an invalid state payload: {1}")]
    Payload(String, String),
    #[error("{0} is not a flick snapshot memory file")]
    NotAMemFile(String),
    #[error(
        "{0} is the memory file of a diff snapshot: merge it onto the memory file of the snapshot it follows first (flick-rebase-snap --base-file BASE --diff-file {0})"
    )]
    DiffMemFile(String),
    #[error("{0} was being merged with a diff snapshot (flick-rebase-snap) and the merge did not finish")]
    Merging(String),
    #[error("memory file {mem} does not belong to state file {state}")]
    Mismatch { mem: String, state: String },
    #[error("memory file {path} holds {found} bytes of RAM; the snapshot needs {expected}")]
    MemSize {
        path: String,
        found: u64,
        expected: u64,
    },
}

/// CRC-32 (IEEE), bitwise; state payloads are small.
pub fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0xedb8_8320 & mask);
        }
    }
    !crc
}

/// Encodes a state payload with its header.
pub fn encode_state(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_BYTES + payload.len());
    out.extend_from_slice(STATE_MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// A format version as the command line prints it (`--snapshot-version`, `--describe-snapshot`):
/// Firecracker's `vMAJOR.MINOR.PATCH` shape; flick's versions are whole numbers.
pub fn format_version_string(version: u32) -> String {
    format!("v{version}.0.0")
}

/// The format version in a state file's header (any version, so old files can be described).
pub fn describe_state_file(path: &Path) -> Result<u32, SnapshotError> {
    let name = path.display().to_string();
    let mut header = [0u8; 12];
    let mut file = File::open(path).map_err(|e| SnapshotError::Read(name.clone(), e))?;
    let mut filled = 0;
    while filled < header.len() {
        match file.read(&mut header[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(SnapshotError::Read(name, e)),
        }
    }
    if filled < 8 || &header[..8] != STATE_MAGIC {
        return Err(SnapshotError::NotAState(name));
    }
    if filled < header.len() {
        return Err(SnapshotError::Truncated(name));
    }
    Ok(u32::from_le_bytes([
        header[8], header[9], header[10], header[11],
    ]))
}

/// Checks a state file's header and checksum; returns the payload.
pub fn decode_state<'a>(name: &str, bytes: &'a [u8]) -> Result<&'a [u8], SnapshotError> {
    if bytes.len() < 8 || &bytes[..8] != STATE_MAGIC {
        return Err(SnapshotError::NotAState(name.into()));
    }
    if bytes.len() < HEADER_BYTES {
        return Err(SnapshotError::Truncated(name.into()));
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().unwrap_or_default());
    if version != FORMAT_VERSION {
        return Err(SnapshotError::Version {
            path: name.into(),
            found: version,
        });
    }
    let len = u64::from_le_bytes(bytes[12..20].try_into().unwrap_or_default());
    let crc = u32::from_le_bytes(bytes[20..24].try_into().unwrap_or_default());
    if len > MAX_PAYLOAD_BYTES {
        return Err(SnapshotError::Checksum(name.into()));
    }
    let payload = &bytes[HEADER_BYTES..];
    let Some(payload) = usize::try_from(len).ok().and_then(|n| payload.get(..n)) else {
        return Err(SnapshotError::Truncated(name.into()));
    };
    if crc32(payload) != crc {
        return Err(SnapshotError::Checksum(name.into()));
    }
    Ok(payload)
}

/// Writes `payload` as a state file at `path` (via a temporary file and rename).
pub fn write_state_file(path: &Path, payload: &[u8]) -> Result<(), SnapshotError> {
    let name = path.display().to_string();
    let tmp = path.with_extension("partial");
    let write = || -> std::io::Result<()> {
        let mut file = File::create(&tmp)?;
        file.write_all(&encode_state(payload))?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        SnapshotError::Write(name, e)
    })
}

/// Reads and checks a state file; returns its payload.
pub fn read_state_file(path: &Path) -> Result<Vec<u8>, SnapshotError> {
    let name = path.display().to_string();
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(|e| SnapshotError::Read(name.clone(), e))?;
    decode_state(&name, &bytes).map(<[u8]>::to_vec)
}

/// What a memory file's trailer says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemTrailer {
    pub snapshot_id: u64,
    pub ram_bytes: u64,
    /// A diff snapshot's memory file (only the pages written since the snapshot before it).
    pub diff: bool,
}

const TRAILER_KIND: usize = 28;
/// The trailer's kind while flick-rebase-snap rewrites a memory file.
const KIND_MERGING: u8 = 2;

/// The memory file's trailer.
pub fn mem_trailer(trailer: MemTrailer) -> Vec<u8> {
    let mut page = vec![0u8; TRAILER_LEN];
    page[..8].copy_from_slice(MEM_MAGIC);
    page[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    page[12..20].copy_from_slice(&trailer.snapshot_id.to_le_bytes());
    page[20..28].copy_from_slice(&trailer.ram_bytes.to_le_bytes());
    page[TRAILER_KIND] = u8::from(trailer.diff);
    page
}

/// Reads the trailer of the memory file at `path` (opened as `file`) and checks that the file
/// holds the RAM it names.
pub fn read_mem_trailer(file: &File, path: &str) -> Result<MemTrailer, SnapshotError> {
    use std::os::unix::fs::FileExt;
    let size = file
        .metadata()
        .map_err(|e| SnapshotError::Read(path.into(), e))?
        .len();
    if size < MEM_TRAILER_BYTES {
        return Err(SnapshotError::NotAMemFile(path.into()));
    }
    let mut page = vec![0u8; TRAILER_LEN];
    file.read_exact_at(&mut page, size - MEM_TRAILER_BYTES)
        .map_err(|e| SnapshotError::Read(path.into(), e))?;
    if &page[..8] != MEM_MAGIC || page[TRAILER_KIND] > KIND_MERGING {
        return Err(SnapshotError::NotAMemFile(path.into()));
    }
    if page[TRAILER_KIND] == KIND_MERGING {
        return Err(SnapshotError::Merging(path.into()));
    }
    let trailer = MemTrailer {
        snapshot_id: u64::from_le_bytes(page[12..20].try_into().unwrap_or_default()),
        ram_bytes: u64::from_le_bytes(page[20..28].try_into().unwrap_or_default()),
        diff: page[TRAILER_KIND] == 1,
    };
    let found = size - MEM_TRAILER_BYTES;
    if found != trailer.ram_bytes {
        return Err(SnapshotError::MemSize {
            path: path.into(),
            found,
            expected: trailer.ram_bytes,
        });
    }
    Ok(trailer)
}

/// Marks the memory file `file` (whose trailer `read_mem_trailer` has read) as being merged: no
/// restore accepts it until its new trailer is written.
pub fn mark_merging(file: &File, path: &str, ram_bytes: u64) -> Result<(), SnapshotError> {
    use std::os::unix::fs::FileExt;
    file.write_all_at(&[KIND_MERGING], ram_bytes + TRAILER_KIND as u64)
        .and_then(|()| file.sync_data())
        .map_err(|e| SnapshotError::Write(path.into(), e))
}

/// Checks that the memory file at `path` (opened as `file`) is a full one that belongs to
/// snapshot `snapshot_id` and holds `ram_bytes` of RAM.
pub fn check_mem_file(
    file: &File,
    path: &str,
    state: &str,
    snapshot_id: u64,
    ram_bytes: u64,
) -> Result<(), SnapshotError> {
    let trailer = read_mem_trailer(file, path)?;
    if trailer.snapshot_id != snapshot_id {
        return Err(SnapshotError::Mismatch {
            mem: path.into(),
            state: state.into(),
        });
    }
    if trailer.diff {
        return Err(SnapshotError::DiffMemFile(path.into()));
    }
    if trailer.ram_bytes != ram_bytes {
        return Err(SnapshotError::MemSize {
            path: path.into(),
            found: trailer.ram_bytes,
            expected: ram_bytes,
        });
    }
    Ok(())
}

/// The next data extent of `file` (not a hole) at or after `from`, cut at `end`: `(start, end)`;
/// `None` when there is no data left before `end`.
pub fn next_data_extent(file: &File, from: u64, end: u64) -> std::io::Result<Option<(u64, u64)>> {
    let seek = |offset: u64, whence: libc::c_int| -> std::io::Result<Option<u64>> {
        let offset = i64::try_from(offset).map_err(std::io::Error::other)?;
        // SAFETY: lseek on an open descriptor; only its offset changes.
        let at = unsafe { libc::lseek(std::os::fd::AsRawFd::as_raw_fd(file), offset, whence) };
        if let Ok(at) = u64::try_from(at) {
            return Ok(Some(at));
        }
        match std::io::Error::last_os_error() {
            e if e.raw_os_error() == Some(libc::ENXIO) => Ok(None),
            e => Err(e),
        }
    };
    if from >= end {
        return Ok(None);
    }
    let Some(start) = seek(from, libc::SEEK_DATA)? else {
        return Ok(None);
    };
    if start >= end {
        return Ok(None);
    }
    let stop = seek(start, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
    Ok(Some((start, stop)))
}

/// A fresh snapshot id: time and process mixed through a 64-bit hash step.
pub fn new_snapshot_id() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos() & u128::from(u64::MAX)).unwrap_or(0))
        .unwrap_or(0);
    let mut x = nanos ^ (u64::from(std::process::id()) << 32);
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
    }

    #[test]
    fn state_round_trips_through_the_header() {
        let bytes = encode_state(b"{\"a\":1}");
        assert_eq!(decode_state("s", &bytes).unwrap(), b"{\"a\":1}");
    }

    #[test]
    fn flipped_payload_byte_is_a_checksum_error() {
        let mut bytes = encode_state(b"{\"a\":1}");
        let last = bytes.len() - 2;
        bytes[last] ^= 1;
        assert!(matches!(
            decode_state("s", &bytes),
            Err(SnapshotError::Checksum(_))
        ));
    }

    #[test]
    fn truncated_state_is_reported() {
        let bytes = encode_state(b"{\"a\":1}");
        assert!(matches!(
            decode_state("s", &bytes[..bytes.len() - 1]),
            Err(SnapshotError::Truncated(_))
        ));
        assert!(matches!(
            decode_state("s", &bytes[..10]),
            Err(SnapshotError::Truncated(_))
        ));
    }

    #[test]
    fn foreign_version_is_reported() {
        let mut bytes = encode_state(b"{}");
        bytes[8] = 99;
        assert!(matches!(
            decode_state("s", &bytes),
            Err(SnapshotError::Version { found: 99, .. })
        ));
    }

    #[test]
    fn a_version_1_state_file_is_refused_with_a_clear_message() {
        // Version 1 headers were laid out like today's; only the payload schema differs.
        let payload = br#"{"snapshot_id":1,"config":{},"ram":[[0,134217728]]}"#;
        let mut bytes = encode_state(payload);
        bytes[8..12].copy_from_slice(&1u32.to_le_bytes());
        let err = decode_state("old.snap", &bytes).unwrap_err();
        assert_eq!(
            err.to_string(),
            "old.snap has snapshot format version 1; this flick reads version 2 \
             (take the snapshot again with this flick)"
        );
    }

    #[test]
    fn other_files_are_not_states() {
        assert!(matches!(
            decode_state("s", b"hello world, not a snapshot"),
            Err(SnapshotError::NotAState(_))
        ));
    }

    #[test]
    fn mem_trailer_identifies_its_snapshot() {
        let path = std::env::temp_dir().join(format!("flick-memtrailer-{}", std::process::id()));
        let mut bytes = vec![7u8; 8192];
        let mut trailer = MemTrailer {
            snapshot_id: 42,
            ram_bytes: 8192,
            diff: false,
        };
        bytes.extend_from_slice(&mem_trailer(trailer));
        std::fs::write(&path, &bytes).unwrap();
        let file = File::open(&path).unwrap();
        assert_eq!(read_mem_trailer(&file, "m").unwrap(), trailer);
        assert!(check_mem_file(&file, "m", "s", 42, 8192).is_ok());
        assert!(matches!(
            check_mem_file(&file, "m", "s", 43, 8192),
            Err(SnapshotError::Mismatch { .. })
        ));
        assert!(matches!(
            check_mem_file(&file, "m", "s", 42, 4096),
            Err(SnapshotError::MemSize { .. })
        ));
        // A diff snapshot's memory file is refused until merged.
        trailer.diff = true;
        bytes.truncate(8192);
        bytes.extend_from_slice(&mem_trailer(trailer));
        std::fs::write(&path, &bytes).unwrap();
        let file = File::open(&path).unwrap();
        assert!(matches!(
            check_mem_file(&file, "m", "s", 42, 8192),
            Err(SnapshotError::DiffMemFile(_))
        ));
        // A merge that did not finish leaves a file no restore takes.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        mark_merging(&file, "m", 8192).unwrap();
        assert!(matches!(
            read_mem_trailer(&file, "m"),
            Err(SnapshotError::Merging(_))
        ));
        let _ = std::fs::remove_file(path);
    }
}
