//! seccomp filters per thread role.
//!
//! Every flick thread confines itself with the BPF program of its role as it starts: the VMM
//! thread (`main`, after set-up, before its event loop), the `flick_api` thread (its connection
//! threads inherit the filter), each `flick_vcpuN` thread, and the short-lived teardown child.
//! The default programs are compiled from `resources/seccomp/<arch>.json` by `build.rs` and
//! embedded in the binary, so installing one is a single `seccomp(2)` call with no parsing or
//! compiling at start-up. A call outside a thread's policy traps (`SECCOMP_RET_TRAP`): the SIGSYS
//! handler writes `flick: error: seccomp: forbidden system call N (arguments A0, A1, ...; thread
//! T)` to stderr and the log file and ends the process with exit code 148, as Firecracker does.
//! (A filter file whose action is `kill_process` kills the process with SIGSYS instead, reported
//! only by the kernel.)
//!
//! File format (the embedded programs and `--seccomp-filter FILE` alike): the serialization of a
//! map from thread role to BPF program that Firecracker's `seccompiler-bin` writes (bincode,
//! fixed-width little-endian integers):
//!
//! ```text
//! u64 entries, then per entry: u64 name length, name bytes (UTF-8),
//!                              u64 instruction count, 8 bytes per instruction
//!                              (u16 code, u8 jt, u8 jf, u32 k)
//! ```
//!
//! Roles are `vmm`, `api` and `vcpu` (all three required, as Firecracker requires them) and
//! `teardown` (optional; without it the teardown child keeps only the filter it inherits from
//! the VMM thread). An entry with no instructions leaves that role without a filter of its own.
//! Imports nothing of the crate.

use std::path::Path;
use std::sync::Arc;

use seccompiler::sock_filter;

/// Threads that get a filter of their own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Vmm,
    Api,
    Vcpu,
    Teardown,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Vmm, Role::Api, Role::Vcpu, Role::Teardown];

    /// The role's key in a filter file.
    pub fn key(self) -> &'static str {
        match self {
            Role::Vmm => "vmm",
            Role::Api => "api",
            Role::Vcpu => "vcpu",
            Role::Teardown => "teardown",
        }
    }

    fn required(self) -> bool {
        self != Role::Teardown
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot read seccomp filter file {0}")]
    Read(String, #[source] std::io::Error),
    #[error("invalid seccomp filter file {path}: {reason}")]
    Invalid { path: String, reason: String },
    #[error("cannot install the seccomp filter of the {0} thread")]
    Install(&'static str, #[source] std::io::Error),
}

/// Largest filter file accepted: the kernel caps a program at 4096 instructions (32 KiB), and a
/// file holds a handful of them.
const MAX_FILE_BYTES: u64 = 1 << 20;
/// The kernel's `BPF_MAXINSNS`.
const MAX_INSTRUCTIONS: usize = 4096;
/// Bytes of one serialized instruction.
const INSTRUCTION_BYTES: usize = 8;

/// One compiled BPF program, shared by the threads of a role.
#[derive(Clone, Debug)]
pub struct Filter(Arc<[sock_filter]>);

impl Filter {
    /// Confines the calling thread (and the threads and children it creates afterwards).
    pub fn install(&self, role: Role) -> Result<(), SeccompError> {
        remember_thread_name(role);
        seccompiler::apply_filter(&self.0).map_err(|e| {
            let io = match e {
                seccompiler::Error::Prctl(io) | seccompiler::Error::Seccomp(io) => io,
                other => std::io::Error::other(other.to_string()),
            };
            SeccompError::Install(role.key(), io)
        })
    }

    /// The kernel's `struct sock_fprog` for this program, for code that must install it without
    /// allocating (the teardown child). Valid as long as this `Filter` lives.
    pub fn as_fprog(&self) -> libc::sock_fprog {
        libc::sock_fprog {
            // `parse` refuses programs longer than MAX_INSTRUCTIONS, which fits in u16.
            len: u16::try_from(self.0.len()).unwrap_or(u16::MAX),
            filter: self.0.as_ptr().cast::<libc::sock_filter>().cast_mut(),
        }
    }

    pub fn instructions(&self) -> usize {
        self.0.len()
    }
}

/// The filter of each role; a role without one runs unconfined (or with what it inherits).
#[derive(Clone, Debug, Default)]
pub struct Filters {
    vmm: Option<Filter>,
    api: Option<Filter>,
    vcpu: Option<Filter>,
    teardown: Option<Filter>,
}

/// The default programs for the build target, compiled by build.rs.
static BUILTIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/seccomp_filters.bin"));

impl Filters {
    /// No filters at all (`--no-seccomp`).
    pub fn none() -> Filters {
        Filters::default()
    }

    /// The filters built into the binary.
    pub fn builtin() -> Result<Filters, SeccompError> {
        Filters::parse(BUILTIN, "(built in)")
    }

    /// Reads a filter file (`--seccomp-filter`).
    pub fn from_file(path: &Path) -> Result<Filters, SeccompError> {
        use std::io::Read;
        let shown = path.display().to_string();
        let file = std::fs::File::open(path).map_err(|e| SeccompError::Read(shown.clone(), e))?;
        let mut bytes = Vec::new();
        file.take(MAX_FILE_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| SeccompError::Read(shown.clone(), e))?;
        Filters::parse(&bytes, &shown)
    }

    /// Decodes the serialized map described in the module documentation.
    pub fn parse(bytes: &[u8], path: &str) -> Result<Filters, SeccompError> {
        let invalid = |reason: String| SeccompError::Invalid {
            path: path.to_string(),
            reason,
        };
        if bytes.len() as u64 > MAX_FILE_BYTES {
            return Err(invalid(format!("larger than {MAX_FILE_BYTES} bytes")));
        }
        let mut reader = Reader { bytes, at: 0 };
        let entries = reader.length("the number of entries").map_err(invalid)?;
        let mut filters = Filters::none();
        let mut seen = Vec::new();
        for _ in 0..entries {
            let name_len = reader.length("a thread name's length").map_err(invalid)?;
            let name = reader.take(name_len, "a thread name").map_err(invalid)?;
            let name = std::str::from_utf8(name)
                .map_err(|_| invalid("a thread name is not UTF-8".into()))?;
            let role = Role::ALL
                .into_iter()
                .find(|r| r.key() == name)
                .ok_or_else(|| {
                    invalid(format!(
                        "unknown thread name {name:?} (expected vmm, api, vcpu or teardown)"
                    ))
                })?;
            let count = reader.length("a program's length").map_err(invalid)?;
            if count > MAX_INSTRUCTIONS {
                return Err(invalid(format!(
                    "the {name} program has {count} instructions (at most {MAX_INSTRUCTIONS})"
                )));
            }
            let code = reader
                .take(count * INSTRUCTION_BYTES, "a program")
                .map_err(invalid)?;
            let program: Arc<[sock_filter]> = code
                .chunks_exact(INSTRUCTION_BYTES)
                .map(|i| sock_filter {
                    code: u16::from_le_bytes([i[0], i[1]]),
                    jt: i[2],
                    jf: i[3],
                    k: u32::from_le_bytes([i[4], i[5], i[6], i[7]]),
                })
                .collect();
            if seen.contains(&role) {
                return Err(invalid(format!("thread name {name:?} appears twice")));
            }
            seen.push(role);
            *filters.slot(role) = (!program.is_empty()).then_some(Filter(program));
        }
        if reader.at != bytes.len() {
            return Err(invalid(format!(
                "{} bytes after the last entry",
                bytes.len() - reader.at
            )));
        }
        // A present but empty entry means "no filter"; a missing one is an error.
        let missing: Vec<&str> = Role::ALL
            .into_iter()
            .filter(|&r| r.required() && !seen.contains(&r))
            .map(Role::key)
            .collect();
        if !missing.is_empty() {
            return Err(invalid(format!(
                "no entry for thread {}",
                missing.join(", ")
            )));
        }
        Ok(filters)
    }

    fn slot(&mut self, role: Role) -> &mut Option<Filter> {
        match role {
            Role::Vmm => &mut self.vmm,
            Role::Api => &mut self.api,
            Role::Vcpu => &mut self.vcpu,
            Role::Teardown => &mut self.teardown,
        }
    }

    pub fn get(&self, role: Role) -> Option<&Filter> {
        match role {
            Role::Vmm => self.vmm.as_ref(),
            Role::Api => self.api.as_ref(),
            Role::Vcpu => self.vcpu.as_ref(),
            Role::Teardown => self.teardown.as_ref(),
        }
    }

    /// Installs `role`'s filter on the calling thread, if it has one.
    pub fn install(&self, role: Role) -> Result<(), SeccompError> {
        match self.get(role) {
            Some(filter) => filter.install(role),
            None => Ok(()),
        }
    }
}

/// Exit code when a seccomp filter traps a system call (Firecracker's `BadSyscall`).
pub const EXIT_BAD_SYSCALL: i32 = 148;

/// Where the SIGSYS report also goes besides stderr (the log file, when there is one); -1: none.
static REPORT_FD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

/// Also write the SIGSYS report to `fd` (the log file's descriptor; kept open by the caller).
pub fn report_to(fd: std::os::fd::RawFd) {
    REPORT_FD.store(fd, std::sync::atomic::Ordering::Relaxed);
}

/// Installs the SIGSYS handler: a filter whose action is `trap` (the built-in ones) stops a
/// forbidden call with SIGSYS, and the handler reports it on stderr (and the log file) as
/// `flick: error: seccomp: forbidden system call N (arguments A0, A1, ...; thread T)` and ends the
/// process with [`EXIT_BAD_SYSCALL`]. It uses only `write` and `exit_group`, which every built-in
/// filter allows.
pub fn install_sigsys_handler() -> std::io::Result<()> {
    // SAFETY: `report_bad_syscall` is async-signal-safe (no allocation, no locks; only write(2)
    // and _exit(2)); the sigaction struct is fully initialised before the call.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = report_bad_syscall as *const () as libc::sighandler_t;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Appends `n` in decimal to `buf` at `*len`, without allocating.
fn push_decimal(buf: &mut [u8], len: &mut usize, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut count = 0;
    loop {
        digits[count] = b'0' + (n % 10) as u8;
        count += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for d in digits[..count].iter().rev() {
        if *len < buf.len() {
            buf[*len] = *d;
            *len += 1;
        }
    }
}

fn push_bytes(buf: &mut [u8], len: &mut usize, bytes: &[u8]) {
    for b in bytes {
        if *len < buf.len() {
            buf[*len] = *b;
            *len += 1;
        }
    }
}

/// Appends `n` in hexadecimal (`0x…`) to `buf` at `*len`, without allocating.
fn push_hex(buf: &mut [u8], len: &mut usize, n: u64) {
    push_bytes(buf, len, b"0x");
    let digits = (64 - n.leading_zeros()).div_ceil(4).max(1);
    for i in (0..digits).rev() {
        let nibble = ((n >> (i * 4)) & 0xf) as u8;
        let c = if nibble < 10 {
            b'0' + nibble
        } else {
            b'a' + nibble - 10
        };
        push_bytes(buf, len, &[c]);
    }
}

/// The report line for a trapped call: number, first two arguments (for `ioctl` the request
/// number, which is what a policy narrows) and the thread's name.
fn bad_syscall_line(buf: &mut [u8], syscall: u64, args: [u64; 2], thread: &[u8]) -> usize {
    let mut len = 0;
    push_bytes(
        buf,
        &mut len,
        b"flick: error: seccomp: forbidden system call ",
    );
    push_decimal(buf, &mut len, syscall);
    push_bytes(buf, &mut len, b" (arguments ");
    push_hex(buf, &mut len, args[0]);
    push_bytes(buf, &mut len, b", ");
    push_hex(buf, &mut len, args[1]);
    push_bytes(buf, &mut len, b", ...; thread ");
    push_bytes(buf, &mut len, thread);
    push_bytes(
        buf,
        &mut len,
        b"); stopped by the thread's filter, see docs/security.md\n",
    );
    len
}

/// The first two arguments of the trapped call, from the registers saved in the signal frame.
///
/// # Safety
/// `context` is null or the `ucontext_t` the kernel passed to an `SA_SIGINFO` handler.
unsafe fn trapped_args(context: *const libc::c_void) -> [u64; 2] {
    if context.is_null() {
        return [u64::MAX; 2];
    }
    let context = context.cast::<libc::ucontext_t>();
    // SAFETY: per the contract, `context` points to the kernel's ucontext_t.
    #[cfg(target_arch = "x86_64")]
    let args = unsafe {
        let regs = &(*context).uc_mcontext.gregs;
        #[allow(clippy::cast_sign_loss)]
        [
            regs[libc::REG_RDI as usize] as u64,
            regs[libc::REG_RSI as usize] as u64,
        ]
    };
    // SAFETY: as above.
    #[cfg(target_arch = "aarch64")]
    let args = unsafe {
        let regs = &(*context).uc_mcontext.regs;
        [regs[0], regs[1]]
    };
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    let args = [u64::MAX; 2];
    args
}

extern "C" fn report_bad_syscall(
    _signal: libc::c_int,
    info: *mut libc::siginfo_t,
    context: *mut libc::c_void,
) {
    // siginfo_t for SIGSYS: after si_signo, si_errno, si_code (and padding) come the call's
    // address (a pointer) and then the system call number (an int).
    const SYSCALL_OFFSET: usize = 16 + std::mem::size_of::<usize>();
    let syscall = if info.is_null() {
        u64::MAX
    } else {
        // SAFETY: the kernel passes a valid siginfo_t with SA_SIGINFO; the offset is inside it.
        let raw = unsafe {
            info.cast::<u8>()
                .add(SYSCALL_OFFSET)
                .cast::<i32>()
                .read_unaligned()
        };
        u64::try_from(raw).unwrap_or(u64::MAX)
    };
    let mut name = [0u8; 16];
    let thread = THREAD_NAME.with(|n| {
        let n = n.get();
        name = n;
        n.iter().position(|b| *b == 0).unwrap_or(n.len())
    });
    let mut line = [0u8; 200];
    // SAFETY: the kernel passes its ucontext_t as the third argument with SA_SIGINFO.
    let args = unsafe { trapped_args(context) };
    let len = bad_syscall_line(&mut line, syscall, args, &name[..thread]);
    let report_fd = REPORT_FD.load(std::sync::atomic::Ordering::Relaxed);
    // SAFETY: write(2) and _exit(2) are async-signal-safe; the buffer is on this stack.
    unsafe {
        libc::write(2, line.as_ptr().cast(), len);
        if report_fd >= 0 {
            libc::write(report_fd, line.as_ptr().cast(), len);
        }
        libc::_exit(EXIT_BAD_SYSCALL);
    }
}

thread_local! {
    /// The role's thread name, for the SIGSYS report (no system call needed to look it up).
    static THREAD_NAME: std::cell::Cell<[u8; 16]> = const { std::cell::Cell::new([0; 16]) };
}

fn remember_thread_name(role: Role) {
    let name = std::thread::current()
        .name()
        .map(str::to_string)
        .unwrap_or_else(|| role.key().to_string());
    let mut bytes = [0u8; 16];
    for (dst, src) in bytes.iter_mut().zip(name.bytes().take(15)) {
        *dst = src;
    }
    THREAD_NAME.with(|n| n.set(bytes));
}

/// Installs `filter` on the calling thread of `role`; a failure ends the process, since the
/// thread would otherwise run without the confinement it was asked for.
pub fn install_or_exit(filter: Option<&Filter>, role: Role) {
    if let Some(filter) = filter {
        if let Err(e) = filter.install(role) {
            let mut text = e.to_string();
            if let Some(source) = std::error::Error::source(&e) {
                text.push_str(&format!(": {source}"));
            }
            eprintln!("flick: error: {text}");
            std::process::exit(1);
        }
    }
}

/// A cursor over a filter file's bytes.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, len: usize, what: &str) -> Result<&'a [u8], String> {
        let end = self
            .at
            .checked_add(len)
            .filter(|&end| end <= self.bytes.len())
            .ok_or_else(|| format!("the file ends inside {what}"))?;
        let taken = &self.bytes[self.at..end];
        self.at = end;
        Ok(taken)
    }

    /// A u64 length, which must fit what is left of the file.
    fn length(&mut self, what: &str) -> Result<usize, String> {
        let raw = self.take(8, what)?;
        let mut le = [0u8; 8];
        le.copy_from_slice(raw);
        let value = u64::from_le_bytes(le);
        usize::try_from(value)
            .ok()
            .filter(|&v| v <= self.bytes.len())
            .ok_or_else(|| format!("{what} ({value}) is larger than the file"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(out: &mut Vec<u8>, name: &str, program: &[[u8; 8]]) {
        out.extend_from_slice(&(name.len() as u64).to_le_bytes());
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&(program.len() as u64).to_le_bytes());
        for i in program {
            out.extend_from_slice(i);
        }
    }

    fn file(entries: &[(&str, usize)]) -> Vec<u8> {
        let mut out = (entries.len() as u64).to_le_bytes().to_vec();
        // BPF_RET | BPF_K, SECCOMP_RET_ALLOW.
        let allow = [0x06, 0, 0, 0, 0, 0, 0xff, 0x7f];
        for (name, len) in entries {
            entry(&mut out, name, &vec![allow; *len]);
        }
        out
    }

    #[test]
    fn builtin_filters_cover_every_role() {
        let filters = Filters::builtin().unwrap();
        for role in Role::ALL {
            let filter = filters.get(role).unwrap_or_else(|| panic!("{role:?}"));
            assert!(filter.instructions() > 4, "{role:?}");
        }
    }

    #[test]
    fn parses_roles_and_empty_entries() {
        let filters = Filters::parse(&file(&[("vmm", 1), ("api", 0), ("vcpu", 2)]), "f").unwrap();
        assert_eq!(filters.get(Role::Vmm).unwrap().instructions(), 1);
        assert!(filters.get(Role::Api).is_none());
        assert_eq!(filters.get(Role::Vcpu).unwrap().instructions(), 2);
        assert!(filters.get(Role::Teardown).is_none());
        let instruction = &filters.get(Role::Vmm).unwrap().0[0];
        assert_eq!((instruction.code, instruction.k), (0x06, 0x7fff_0000));
    }

    #[test]
    fn refuses_malformed_files() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (Vec::new(), "ends inside"),
            (file(&[("vmm", 1), ("api", 1)]), "no entry for thread vcpu"),
            (
                file(&[("vmm", 1), ("api", 1), ("vcpu", 1), ("gpu", 1)]),
                "unknown thread name",
            ),
            (
                file(&[("vmm", 1), ("vmm", 1), ("api", 1), ("vcpu", 1)]),
                "twice",
            ),
            (
                file(&[("vmm", 4097), ("api", 1), ("vcpu", 1)]),
                "at most 4096",
            ),
            (
                {
                    let mut f = file(&[("vmm", 1), ("api", 1), ("vcpu", 1)]);
                    f.push(0);
                    f
                },
                "1 bytes after",
            ),
            (
                {
                    let mut f = file(&[("vmm", 1), ("api", 1), ("vcpu", 1)]);
                    f.truncate(f.len() - 3);
                    f
                },
                "ends inside a program",
            ),
            (u64::MAX.to_le_bytes().to_vec(), "larger than the file"),
        ];
        for (bytes, expected) in cases {
            let error = Filters::parse(&bytes, "f").unwrap_err().to_string();
            assert!(error.contains(expected), "{error:?} lacks {expected:?}");
            assert!(!error.contains('\n'));
        }
    }

    #[test]
    fn the_report_line_names_number_arguments_and_thread() {
        let mut buf = [0u8; 200];
        let len = bad_syscall_line(&mut buf, 29, [3, 0xc008_aeb0], b"flick_vcpu1");
        assert_eq!(
            std::str::from_utf8(&buf[..len]).unwrap(),
            "flick: error: seccomp: forbidden system call 29 (arguments 0x3, 0xc008aeb0, ...; \
             thread flick_vcpu1); stopped by the thread's filter, see docs/security.md\n"
        );
        let len = bad_syscall_line(&mut buf, 0, [0, u64::MAX], b"");
        assert!(std::str::from_utf8(&buf[..len])
            .unwrap()
            .contains("call 0 (arguments 0x0, 0xffffffffffffffff, ...; thread );"));
    }
}
