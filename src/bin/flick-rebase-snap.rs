//! `flick-rebase-snap --base-file BASE --diff-file DIFF`: writes the pages a diff snapshot's
//! memory file holds (its data extents; holes are pages that did not change) over BASE, the
//! memory file of the snapshot the diff follows, and gives BASE the diff's trailer marked full.
//! BASE then belongs to the diff snapshot's state file and restores like any full snapshot.
//! Repeat with each later diff, in order. Firecracker's `rebase-snap` takes the same flags.
//! While it runs, BASE's trailer says it is being merged, so an interrupted merge leaves a file
//! every restore refuses rather than a mix of two snapshots that looks valid.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::process::ExitCode;

use clap::Parser;
use flick::snapshot::{self, MemTrailer};

#[derive(Parser, Debug)]
#[command(
    name = "flick-rebase-snap",
    about = "Merge a diff snapshot's memory file onto its base memory file"
)]
struct Args {
    /// The memory file of the snapshot the diff was taken after (full, or merged already);
    /// rewritten in place.
    #[arg(long)]
    base_file: String,
    /// The diff snapshot's memory file.
    #[arg(long)]
    diff_file: String,
}

#[derive(Debug, thiserror::Error)]
enum RebaseError {
    #[error(transparent)]
    Snapshot(#[from] snapshot::SnapshotError),
    #[error("{0} is not a diff snapshot's memory file")]
    NotDiff(String),
    #[error("{0} is itself a diff snapshot's memory file: merge it onto its own base first")]
    BaseIsDiff(String),
    #[error("{diff} holds {diff_bytes} bytes of RAM, {base} {base_bytes}: not the same VM")]
    Size {
        diff: String,
        diff_bytes: u64,
        base: String,
        base_bytes: u64,
    },
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
}

fn rebase(args: &Args) -> Result<u64, RebaseError> {
    let io = |name: &str| {
        let name = name.to_string();
        move |e| RebaseError::Io(name, e)
    };
    let diff = File::open(&args.diff_file).map_err(io(&args.diff_file))?;
    let diff_trailer = snapshot::read_mem_trailer(&diff, &args.diff_file)?;
    if !diff_trailer.diff {
        return Err(RebaseError::NotDiff(args.diff_file.clone()));
    }
    let mut base = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&args.base_file)
        .map_err(io(&args.base_file))?;
    let base_trailer = snapshot::read_mem_trailer(&base, &args.base_file)?;
    if base_trailer.diff {
        return Err(RebaseError::BaseIsDiff(args.base_file.clone()));
    }
    if base_trailer.ram_bytes != diff_trailer.ram_bytes {
        return Err(RebaseError::Size {
            diff: args.diff_file.clone(),
            diff_bytes: diff_trailer.ram_bytes,
            base: args.base_file.clone(),
            base_bytes: base_trailer.ram_bytes,
        });
    }
    let ram = diff_trailer.ram_bytes;
    // Until the new trailer is written, BASE is neither the old snapshot nor the new one: its
    // trailer says so, and restores refuse it.
    snapshot::mark_merging(&base, &args.base_file, ram)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut copied = 0u64;
    let mut at = 0u64;
    let mut reader = &diff;
    while let Some((start, end)) =
        snapshot::next_data_extent(&diff, at, ram).map_err(io(&args.diff_file))?
    {
        reader
            .seek(SeekFrom::Start(start))
            .map_err(io(&args.diff_file))?;
        base.seek(SeekFrom::Start(start))
            .map_err(io(&args.base_file))?;
        let mut left = end - start;
        while left > 0 {
            let n = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
            reader
                .read_exact(&mut buf[..n])
                .map_err(io(&args.diff_file))?;
            base.write_all(&buf[..n]).map_err(io(&args.base_file))?;
            left -= n as u64;
        }
        copied += end - start;
        at = end;
    }
    // The base now holds the diff snapshot's memory: it takes the diff's id, as a full file.
    base.seek(SeekFrom::Start(ram))
        .map_err(io(&args.base_file))?;
    base.write_all(&snapshot::mem_trailer(MemTrailer {
        diff: false,
        ..diff_trailer
    }))
    .map_err(io(&args.base_file))?;
    base.sync_all().map_err(io(&args.base_file))?;
    Ok(copied)
}

fn main() -> ExitCode {
    let args = Args::parse();
    match rebase(&args) {
        Ok(copied) => {
            eprintln!(
                "flick-rebase-snap: wrote {} KiB of {} onto {}",
                copied / 1024,
                args.diff_file,
                args.base_file
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("flick-rebase-snap: error: {}", flick::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
