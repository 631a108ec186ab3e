//! Runs one command and measures it: spawn → first stdout byte, spawn → exit (or → a marker
//! line, or → API ready), the child's CPU time and peak RSS from `wait4`, the VMM's boot-timer
//! line and, for VMMs, the resident memory that is not guest RAM (sampled from
//! `/proc/PID/smaps` while the process runs).

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use flick_fixtures::http;

/// Set by the SIGINT/SIGTERM handler; every wait loop checks it.
pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Installs SIGINT/SIGTERM handlers that only set [`INTERRUPTED`], so the harness can kill
/// what it started and remove its files before it exits.
pub fn install_signal_handlers() {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_signal as *const () as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        sa.sa_flags = 0;
        libc::sigaction(libc::SIGINT, &sa, std::ptr::null_mut());
        libc::sigaction(libc::SIGTERM, &sa, std::ptr::null_mut());
    }
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// One HTTP request sent over the VMM's API socket (API-mode variants).
#[derive(Clone, Debug)]
pub struct ApiRequest {
    pub method: &'static str,
    pub path: String,
    pub body: Option<String>,
    /// The response body must contain this.
    pub expect: Option<String>,
    /// Its answer ends the measurement (the last such request counts); untimed requests
    /// after it only check the outcome.
    pub timed: bool,
}

#[derive(Clone, Debug, Default)]
pub struct Spec {
    pub argv: Vec<String>,
    pub timeout: Duration,
    /// Guest RAM size in KiB: when set, `/proc/PID/smaps` is sampled and mappings of exactly
    /// this size are left out of the overhead (Firecracker's method).
    pub guest_mem_kib: Option<u64>,
    /// End the measurement when stdout contains this text (the VMM is then killed).
    pub stop_marker: Option<String>,
    /// The end event is stdout containing this text, but the process runs on to its own exit,
    /// which must be a clean one (exit_ms is then spawn → exit).
    pub end_marker: Option<String>,
    /// Written to the process's stdin right after the spawn (then stdin is closed).
    pub stdin: Option<Vec<u8>>,
    /// The VMM's log file (truncated before the run, read after it for the boot-timer line).
    pub log_file: Option<PathBuf>,
    /// API mode: connect to this socket until it accepts, send the requests, then kill.
    pub api_sock: Option<PathBuf>,
    pub api_requests: Vec<ApiRequest>,
    /// API mode: after the requests, wait (up to 2 s) for the first stdout byte before the
    /// kill, so spawn → first output can be measured (e.g. a restored guest printing again).
    pub api_wait_output: bool,
}

#[derive(Clone, Debug, Default)]
pub struct Outcome {
    pub ok: bool,
    pub error: Option<String>,
    pub first_output_ms: Option<f64>,
    /// Spawn → the end event: exit, the marker line, or the last API response.
    pub end_ms: Option<f64>,
    pub exit_ms: f64,
    pub status: String,
    pub cpu_ms: f64,
    pub maxrss_kib: u64,
    pub boot_timer_ms: Option<f64>,
    pub overhead_kib: Option<u64>,
    pub rss_kib: Option<u64>,
    pub samples: u32,
    /// Whether smaps sampling was on for this run.
    pub sampled: bool,
    pub stdout: String,
    pub stderr: String,
    pub log: String,
}

/// Parses `Guest-boot-time = N us ...` (Firecracker's and flick's boot-timer log line), in ms.
pub fn parse_boot_time_ms(text: &str) -> Option<f64> {
    let line = text.lines().find(|l| l.contains("Guest-boot-time ="))?;
    let after = line.split("Guest-boot-time =").nth(1)?;
    let us: f64 = after.split_whitespace().next()?.parse().ok()?;
    Some(us / 1e3)
}

/// Resident memory of one process from its smaps: (total Rss, Rss of mappings whose size is
/// not `exclude_size_kib`, number of mappings), in KiB.
pub fn smaps_rss(pid: i32, exclude_size_kib: u64) -> Option<(u64, u64, u64, usize)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let (mut total, mut overhead, mut pss, mut maps) = (0u64, 0u64, 0u64, 0usize);
    let mut size = 0u64;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("Size:") {
            size = kib(rest);
            maps += 1;
        } else if let Some(rest) = line.strip_prefix("Rss:") {
            let rss = kib(rest);
            total += rss;
            if size != exclude_size_kib {
                overhead += rss;
            }
        } else if let Some(rest) = line.strip_prefix("Pss:") {
            pss += kib(rest);
        }
    }
    if maps == 0 {
        return None;
    }
    Some((total, overhead, pss, maps))
}

/// Private_Clean + Private_Dirty over all mappings of `pid` (memory no other process shares).
pub fn smaps_private_kib(pid: i32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    Some(
        text.lines()
            .filter_map(|l| {
                l.strip_prefix("Private_Clean:")
                    .or_else(|| l.strip_prefix("Private_Dirty:"))
            })
            .map(kib)
            .sum(),
    )
}

fn kib(field: &str) -> u64 {
    field
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

struct Shared {
    done: Mutex<bool>,
    cv: Condvar,
}

impl Shared {
    /// Sleeps up to `d` or until the run is over; returns true when it is over.
    fn wait(&self, d: Duration) -> bool {
        let guard = self.done.lock().unwrap();
        if *guard {
            return true;
        }
        let (guard, _) = self.cv.wait_timeout(guard, d).unwrap();
        *guard
    }
    fn finish(&self) {
        *self.done.lock().unwrap() = true;
        self.cv.notify_all();
    }
}

/// Blocks until `pid` has exited, without reaping it (the zombie keeps the pid ours).
fn wait_exit_nowait(pid: i32) {
    loop {
        // SAFETY: plain syscall on our own child; `info` is written by the kernel.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid on our own child, writing only into `info`.
        let r = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        if r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return;
        }
    }
}

/// Has `pid` exited? (does not reap)
pub fn exited_nowait(pid: i32) -> bool {
    // SAFETY: siginfo_t is plain data; all zeroes is a valid value.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid on our own child, writing only into `info`.
    let r = unsafe {
        libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOWAIT | libc::WNOHANG,
        )
    };
    // SAFETY: si_pid is valid for a WEXITED report; 0 means "still running".
    r == 0 && unsafe { info.si_pid() } != 0
}

/// Reaps `pid` and returns (status text, exit code if any, CPU ms, peak RSS KiB).
fn reap(pid: i32) -> (String, Option<i32>, f64, u64) {
    let mut status = 0;
    // SAFETY: `ru` is written by the kernel.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: wait4 on our own child, writing only into `status` and `ru`.
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
        if r == pid || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            break;
        }
    }
    let cpu_ms = (ru.ru_utime.tv_sec as f64 + ru.ru_stime.tv_sec as f64) * 1e3
        + (ru.ru_utime.tv_usec as f64 + ru.ru_stime.tv_usec as f64) / 1e3;
    let (text, code) = if libc::WIFEXITED(status) {
        let c = libc::WEXITSTATUS(status);
        (format!("exit {c}"), Some(c))
    } else if libc::WIFSIGNALED(status) {
        (format!("signal {}", libc::WTERMSIG(status)), None)
    } else {
        (format!("status {status:#x}"), None)
    };
    (text, code, cpu_ms, ru.ru_maxrss as u64)
}

pub fn kill(pid: i32) {
    // SAFETY: only called on our own unreaped child.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
}

fn tail(s: &str, lines: usize) -> String {
    let v: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
    v[v.len().saturating_sub(lines)..].join(" | ")
}

struct Captured {
    buf: Vec<u8>,
    first: Option<Instant>,
    marker: Option<Instant>,
    eof: bool,
}

fn reader(
    mut src: impl Read + Send + 'static,
    pid: i32,
    marker: Option<String>,
    kill_at_marker: bool,
) -> Arc<(Mutex<Captured>, Condvar)> {
    let state = Arc::new((
        Mutex::new(Captured {
            buf: Vec::new(),
            first: None,
            marker: None,
            eof: false,
        }),
        Condvar::new(),
    ));
    let st = state.clone();
    thread::spawn(move || {
        let mut chunk = [0u8; 16384];
        loop {
            match src.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => {
                    let now = Instant::now();
                    let mut c = st.0.lock().unwrap();
                    if c.first.is_none() {
                        c.first = Some(now);
                    }
                    let from = c.buf.len();
                    c.buf.extend_from_slice(&chunk[..n]);
                    if let (None, Some(m)) = (c.marker, marker.as_deref()) {
                        let start = from.saturating_sub(m.len());
                        if c.buf[start..].windows(m.len()).any(|w| w == m.as_bytes()) {
                            c.marker = Some(now);
                            if kill_at_marker {
                                kill(pid);
                            }
                        }
                    }
                    // Keep memory bounded on chatty guests.
                    if c.buf.len() > 4 << 20 {
                        let cut = c.buf.len() - (1 << 20);
                        c.buf.drain(..cut);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        st.0.lock().unwrap().eof = true;
        st.1.notify_all();
    });
    state
}

/// Waits (bounded) for a reader to see EOF: a grandchild (e.g. podman's conmon) may hold
/// the pipe open after the measured process exited.
fn collect(state: &Arc<(Mutex<Captured>, Condvar)>) -> (String, Option<Instant>, Option<Instant>) {
    let deadline = Instant::now() + Duration::from_millis(1000);
    let mut c = state.0.lock().unwrap();
    while !c.eof {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        c = state.1.wait_timeout(c, deadline - now).unwrap().0;
    }
    (
        String::from_utf8_lossy(&c.buf).into_owned(),
        c.first,
        c.marker,
    )
}

pub fn run(spec: &Spec) -> Outcome {
    let mut out = Outcome::default();
    if let Some(log) = &spec.log_file {
        // Firecracker opens its log without O_CREAT: the file must exist, and be empty.
        if let Err(e) = std::fs::write(log, b"") {
            out.error = Some(format!("cannot create log file {}: {e}", log.display()));
            return out;
        }
    }
    if let Some(sock) = &spec.api_sock {
        let _ = std::fs::remove_file(sock);
    }
    let mut cmd = Command::new(&spec.argv[0]);
    cmd.args(&spec.argv[1..])
        .stdin(if spec.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let t0 = Instant::now();
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            out.error = Some(format!("cannot start {}: {e}", spec.argv[0]));
            return out;
        }
    };
    let pid = child.id() as i32;
    if let (Some(data), Some(mut stdin)) = (spec.stdin.clone(), child.stdin.take()) {
        thread::spawn(move || {
            use std::io::Write as _;
            let _ = stdin.write_all(&data);
        });
    }
    let (marker, kill_at_marker) = match (&spec.stop_marker, &spec.end_marker) {
        (Some(m), _) => (Some(m.clone()), true),
        (None, Some(m)) => (Some(m.clone()), false),
        (None, None) => (None, false),
    };
    let so = reader(child.stdout.take().unwrap(), pid, marker, kill_at_marker);
    let se = reader(child.stderr.take().unwrap(), pid, None, false);
    let shared = Arc::new(Shared {
        done: Mutex::new(false),
        cv: Condvar::new(),
    });

    // Watchdog: timeout and Ctrl-C.
    let timed_out = Arc::new(AtomicBool::new(false));
    let watchdog = {
        let (shared, timed_out, timeout) = (shared.clone(), timed_out.clone(), spec.timeout);
        thread::spawn(move || loop {
            if shared.wait(Duration::from_millis(50)) {
                return;
            }
            if interrupted() || t0.elapsed() > timeout {
                timed_out.store(!interrupted(), Ordering::SeqCst);
                kill(pid);
                return;
            }
        })
    };

    // Memory sampler: every ~1 ms for the first 2 s, then every 10 ms.
    let sampler = spec.guest_mem_kib.map(|guest_kib| {
        let shared = shared.clone();
        thread::spawn(move || {
            let (mut max_over, mut max_total, mut n) = (0u64, 0u64, 0u32);
            loop {
                if let Some((total, over, _, _)) = smaps_rss(pid, guest_kib) {
                    max_over = max_over.max(over);
                    max_total = max_total.max(total);
                    n += 1;
                }
                let period = if t0.elapsed() < Duration::from_secs(2) {
                    1
                } else {
                    10
                };
                if shared.wait(Duration::from_millis(period)) {
                    return (max_over, max_total, n);
                }
            }
        })
    });

    // API mode: connect-retry, requests, then kill.
    let mut api_done: Option<Instant> = None;
    let mut at_ready: Option<(u64, u64)> = None;
    if let Some(sock) = &spec.api_sock {
        match api_sequence(pid, sock, &spec.api_requests, t0, spec.timeout) {
            Ok(at) => {
                api_done = Some(at);
                if spec.api_wait_output {
                    let until = Instant::now() + Duration::from_secs(2);
                    while so.0.lock().unwrap().first.is_none() && Instant::now() < until {
                        thread::sleep(Duration::from_micros(100));
                    }
                }
                // One more sample at the moment the API answered, before the kill.
                if let Some(g) = spec.guest_mem_kib {
                    at_ready = smaps_rss(pid, g).map(|(total, over, _, _)| (total, over));
                }
            }
            Err(e) => out.error = Some(e),
        }
        kill(pid);
    }

    wait_exit_nowait(pid);
    let exit_at = Instant::now();
    shared.finish();
    let _ = watchdog.join();
    out.sampled = sampler.is_some();
    if let Some(s) = sampler {
        let (mut over, mut total, mut n) = s.join().unwrap_or((0, 0, 0));
        if let Some((t, o)) = at_ready {
            over = over.max(o);
            total = total.max(t);
            n += 1;
        }
        out.samples = n;
        if n > 0 {
            out.overhead_kib = Some(over);
            out.rss_kib = Some(total);
        }
    }
    let (status, code, cpu_ms, maxrss) = reap(pid);
    drop(child);
    let (stdout, first, marker) = collect(&so);
    let (stderr, _, _) = collect(&se);
    out.status = status;
    out.cpu_ms = cpu_ms;
    out.maxrss_kib = maxrss;
    out.exit_ms = ms(exit_at - t0);
    out.first_output_ms = first.map(|f| ms(f - t0));
    if let Some(log) = &spec.log_file {
        out.log = std::fs::read_to_string(log).unwrap_or_default();
    }
    out.boot_timer_ms = parse_boot_time_ms(&out.log)
        .or_else(|| parse_boot_time_ms(&stderr))
        .or_else(|| parse_boot_time_ms(&stdout));
    if let Some(sock) = &spec.api_sock {
        let _ = std::fs::remove_file(sock);
    }

    if interrupted() {
        out.error = Some("interrupted".into());
    } else if timed_out.load(Ordering::SeqCst) {
        out.error = Some(format!(
            "timed out after {:.0} s; stderr: {}; stdout: {}",
            spec.timeout.as_secs_f64(),
            tail(&stderr, 3),
            tail(&stdout, 3)
        ));
    } else if spec.stop_marker.is_some() {
        match marker {
            Some(m) => out.end_ms = Some(ms(m - t0)),
            None => {
                out.error = Some(format!(
                    "{} before {:?} was printed; stderr: {}; stdout: {}",
                    out.status,
                    spec.stop_marker.as_deref().unwrap_or(""),
                    tail(&stderr, 3),
                    tail(&stdout, 3)
                ))
            }
        }
    } else if let Some(m) = &spec.end_marker {
        match (marker, code) {
            (Some(at), Some(0)) => out.end_ms = Some(ms(at - t0)),
            (None, _) => {
                out.error = Some(format!(
                    "{} before {m:?} was printed; stderr: {}; stdout: {}",
                    out.status,
                    tail(&stderr, 3),
                    tail(&stdout, 3)
                ))
            }
            (Some(_), _) => {
                out.error = Some(format!(
                    "{} after printing {m:?}; stderr: {}",
                    out.status,
                    tail(&stderr, 3)
                ))
            }
        }
    } else if spec.api_sock.is_some() {
        if let Some(at) = api_done {
            out.end_ms = Some(ms(at - t0));
        } else {
            let e = out.error.take().unwrap_or_default();
            out.error = Some(format!("{e}; {}; stderr: {}", out.status, tail(&stderr, 3)));
        }
    } else if code == Some(0) {
        out.end_ms = Some(out.exit_ms);
    } else {
        out.error = Some(format!(
            "{}; stderr: {}; stdout: {}",
            out.status,
            tail(&stderr, 3),
            tail(&stdout, 2)
        ));
    }
    out.ok = out.error.is_none();
    out.stdout = stdout;
    out.stderr = stderr;
    out
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Connects to `sock` until it accepts (or the VMM exits), then sends `requests` in order;
/// each must answer 2xx. Returns the moment the last response arrived.
fn api_sequence(
    pid: i32,
    sock: &std::path::Path,
    requests: &[ApiRequest],
    t0: Instant,
    timeout: Duration,
) -> Result<Instant, String> {
    let mut last = None;
    for req in requests {
        loop {
            if interrupted() {
                return Err("interrupted".into());
            }
            if t0.elapsed() > timeout {
                return Err(format!("API socket not ready after {timeout:?}"));
            }
            if exited_nowait(pid) {
                return Err("the VMM exited before its API answered".into());
            }
            match http::request(sock, req.method, &req.path, req.body.as_deref()) {
                Ok((code, body)) if (200..300).contains(&code) => {
                    let now = Instant::now();
                    if let Some(want) = &req.expect {
                        if !body.contains(want.as_str()) {
                            return Err(format!(
                                "{} {} answered without {want:?}: {}",
                                req.method,
                                req.path,
                                body.trim()
                            ));
                        }
                    }
                    if req.timed {
                        last = Some(now);
                    }
                    break;
                }
                Ok((code, body)) => {
                    return Err(format!(
                        "{} {} answered {code}: {}",
                        req.method,
                        req.path,
                        body.trim()
                    ))
                }
                Err(_) => thread::sleep(Duration::from_micros(50)),
            }
        }
    }
    last.ok_or_else(|| "no timed API request given".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_time_line() {
        let log = "x\n2026-11-25T10:37:23.109789 [anonymous-instance:flick_vcpu0] Guest-boot-time =   5031 us 5 ms,   1583 CPU us 1 CPU ms\n";
        assert_eq!(parse_boot_time_ms(log), Some(5.031));
        assert_eq!(parse_boot_time_ms("nothing"), None);
    }

    #[test]
    fn smaps_of_self() {
        let (total, over, _, maps) = smaps_rss(std::process::id() as i32, u64::MAX).unwrap();
        assert!(maps > 0 && total > 0);
        assert_eq!(total, over);
    }

    #[test]
    fn run_measures_a_process() {
        let o = run(&Spec {
            argv: vec!["sh".into(), "-c".into(), "echo hi; echo err >&2".into()],
            timeout: Duration::from_secs(10),
            ..Default::default()
        });
        assert!(o.ok, "{:?}", o.error);
        assert_eq!(o.stdout, "hi\n");
        assert_eq!(o.stderr, "err\n");
        // The reader thread stamps the output when it wakes, which can be just after the exit.
        assert!(o.first_output_ms.unwrap() <= o.end_ms.unwrap() + 50.0);
        assert!(o.maxrss_kib > 0);
    }

    #[test]
    fn run_stops_at_marker_and_reports_failures() {
        let o = run(&Spec {
            argv: vec![
                "sh".into(),
                "-c".into(),
                "echo booting; echo 'Run /init as init process'; exec sleep 30".into(),
            ],
            timeout: Duration::from_secs(10),
            stop_marker: Some("Run /init as init process".into()),
            ..Default::default()
        });
        assert!(o.ok, "{:?}", o.error);
        assert!(o.end_ms.unwrap() < 5000.0);
        let o = run(&Spec {
            argv: vec!["sh".into(), "-c".into(), "echo oops >&2; exit 3".into()],
            timeout: Duration::from_secs(10),
            ..Default::default()
        });
        assert!(!o.ok);
        assert!(o.error.unwrap().contains("exit 3"));
    }
}
