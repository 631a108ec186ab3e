//! A small `tracing` subscriber: one line per event, to stderr or a file, with Firecracker's
//! level names and optional level and origin. Levels and destination can change at run time
//! (`PUT /logger`). Imports only `config`.

use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Mutex;

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};

use crate::config::{LogLevel, LoggerConfig};

static LEVEL: AtomicU8 = AtomicU8::new(LogLevel::Warning as u8);
static SHOW_LEVEL: AtomicBool = AtomicBool::new(false);
static SHOW_ORIGIN: AtomicBool = AtomicBool::new(false);
static OUTPUT: Mutex<Option<Box<dyn Write + Send>>> = Mutex::new(None);
static INSTANCE: Mutex<String> = Mutex::new(String::new());
/// `module`: only lines from module paths starting with this (with or without `flick::`).
static MODULE: Mutex<Option<String>> = Mutex::new(None);
/// Whether `MODULE` holds a filter (so that unfiltered logging takes no lock).
static MODULE_SET: AtomicBool = AtomicBool::new(false);

#[derive(Debug, thiserror::Error)]
pub enum LoggerError {
    #[error("cannot open log file {0}")]
    Open(String, #[source] std::io::Error),
}

fn rank(level: &Level) -> u8 {
    match *level {
        Level::ERROR => LogLevel::Error as u8,
        Level::WARN => LogLevel::Warning as u8,
        Level::INFO => LogLevel::Info as u8,
        Level::DEBUG => LogLevel::Debug as u8,
        Level::TRACE => LogLevel::Trace as u8,
    }
}

fn level_name(level: &Level) -> &'static str {
    match *level {
        Level::ERROR => "ERROR",
        Level::WARN => "WARN",
        Level::INFO => "INFO",
        Level::DEBUG => "DEBUG",
        Level::TRACE => "TRACE",
    }
}

/// The log file's descriptor (-1 while lines go to stderr).
static FILE_FD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

/// The open log file's descriptor, if lines go to a file.
pub fn file_fd() -> Option<std::os::fd::RawFd> {
    let fd = FILE_FD.load(Ordering::Relaxed);
    (fd >= 0).then_some(fd)
}

/// Sets the level and where lines go.
pub fn configure(config: &LoggerConfig) -> Result<(), LoggerError> {
    if let Some(path) = &config.log_path {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| LoggerError::Open(path.clone(), e))?;
        FILE_FD.store(std::os::fd::AsRawFd::as_raw_fd(&file), Ordering::Relaxed);
        *OUTPUT.lock().unwrap_or_else(|p| p.into_inner()) = Some(Box::new(file));
    }
    if let Some(level) = config.level {
        LEVEL.store(level as u8, Ordering::Relaxed);
    }
    if let Some(module) = &config.module {
        let module = module.strip_prefix("flick::").unwrap_or(module);
        let filter = (!module.is_empty()).then(|| module.to_string());
        MODULE_SET.store(filter.is_some(), Ordering::Relaxed);
        *MODULE.lock().unwrap_or_else(|p| p.into_inner()) = filter;
    }
    SHOW_LEVEL.store(config.show_level, Ordering::Relaxed);
    SHOW_ORIGIN.store(config.show_log_origin, Ordering::Relaxed);
    Ok(())
}

/// Installs the subscriber; `instance` prefixes every line.
pub fn init(instance: &str, level: LogLevel) {
    LEVEL.store(level as u8, Ordering::Relaxed);
    *INSTANCE.lock().unwrap_or_else(|p| p.into_inner()) = instance.to_string();
    let _ = tracing::subscriber::set_global_default(Logger);
}

/// Whether the `module` filter lets a line from `path` through.
fn module_allowed(path: Option<&str>) -> bool {
    if !MODULE_SET.load(Ordering::Relaxed) {
        return true;
    }
    let filter = MODULE.lock().unwrap_or_else(|p| p.into_inner());
    let Some(filter) = filter.as_deref() else {
        return true;
    };
    let path = path.unwrap_or("");
    let path = path.strip_prefix("flick::").unwrap_or(path);
    path.starts_with(filter)
}

/// Wall-clock time as `YYYY-MM-DDTHH:MM:SS.uuuuuu` (UTC).
fn timestamp() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = i64::try_from(days).unwrap_or(0) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        now.subsec_micros()
    )
}

struct Logger;

#[derive(Default)]
struct Line(String);

impl Visit for Line {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0.push_str(value);
        } else {
            let _ = write!(self.0, " {}={value}", field.name());
        }
    }
}

impl Subscriber for Logger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        rank(metadata.level()) <= LEVEL.load(Ordering::Relaxed)
            && module_allowed(metadata.module_path())
    }

    fn register_callsite(&self, _: &'static Metadata<'static>) -> tracing::subscriber::Interest {
        tracing::subscriber::Interest::sometimes()
    }

    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }

    fn record(&self, _: &Id, _: &Record<'_>) {}

    fn record_follows_from(&self, _: &Id, _: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let meta = event.metadata();
        let thread = std::thread::current();
        let mut line = format!(
            "{} [{}:{}]",
            timestamp(),
            INSTANCE.lock().unwrap_or_else(|p| p.into_inner()),
            thread.name().unwrap_or("?")
        );
        if SHOW_LEVEL.load(Ordering::Relaxed) {
            let _ = write!(line, ":{}", level_name(meta.level()));
        }
        if SHOW_ORIGIN.load(Ordering::Relaxed) {
            let _ = write!(
                line,
                ":{}:{}",
                meta.file().unwrap_or("?"),
                meta.line().unwrap_or(0)
            );
        }
        line.push(' ');
        let mut fields = Line(line);
        event.record(&mut fields);
        fields.0.push('\n');
        let mut out = OUTPUT.lock().unwrap_or_else(|p| p.into_inner());
        match out.as_mut() {
            Some(w) => {
                let _ = w.write_all(fields.0.as_bytes());
                let _ = w.flush();
            }
            None => {
                let _ = std::io::stderr().write_all(fields.0.as_bytes());
            }
        }
    }

    fn enter(&self, _: &Id) {}

    fn exit(&self, _: &Id) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamp_has_iso_shape() {
        let ts = timestamp();
        assert_eq!(ts.len(), 26, "{ts}");
        assert_eq!(&ts[4..5], "-");
        assert_eq!(&ts[10..11], "T");
        assert!(ts.starts_with("20"));
    }

    #[test]
    fn levels_rank_from_error_to_trace() {
        assert!(rank(&Level::ERROR) < rank(&Level::WARN));
        assert!(rank(&Level::INFO) < rank(&Level::TRACE));
    }
}

/// A per-call-site budget for log lines a guest can trigger at will: at most
/// [`LogRateLimit::BURST`] lines per [`LogRateLimit::WINDOW_MS`]; the rest are counted and their
/// number is logged with the next line let through. Use it through [`warn_limited!`].
#[derive(Debug)]
pub struct LogRateLimit {
    window_start_ms: std::sync::atomic::AtomicU64,
    in_window: std::sync::atomic::AtomicU64,
    suppressed: std::sync::atomic::AtomicU64,
}

impl Default for LogRateLimit {
    fn default() -> Self {
        Self::new()
    }
}

impl LogRateLimit {
    pub const BURST: u64 = 10;
    pub const WINDOW_MS: u64 = 5_000;

    pub const fn new() -> Self {
        use std::sync::atomic::AtomicU64;
        LogRateLimit {
            window_start_ms: AtomicU64::new(0),
            in_window: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    fn now_ms() -> u64 {
        static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        let start = START.get_or_init(std::time::Instant::now);
        u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// `Some(n)` when a line may be logged now, `n` being the lines suppressed before it.
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(Self::now_ms())
    }

    fn allow_at(&self, now_ms: u64) -> Option<u64> {
        use std::sync::atomic::Ordering::Relaxed;
        let start = self.window_start_ms.load(Relaxed);
        if now_ms.saturating_sub(start) >= Self::WINDOW_MS || self.in_window.load(Relaxed) == 0 {
            self.window_start_ms.store(now_ms, Relaxed);
            self.in_window.store(0, Relaxed);
        }
        if self.in_window.fetch_add(1, Relaxed) >= Self::BURST {
            self.suppressed.fetch_add(1, Relaxed);
            return None;
        }
        Some(self.suppressed.swap(0, Relaxed))
    }
}

/// `tracing::warn!` for lines a guest can trigger, rate-limited per call site.
#[macro_export]
macro_rules! warn_limited {
    ($($arg:tt)*) => {{
        static LIMIT: $crate::logger::LogRateLimit = $crate::logger::LogRateLimit::new();
        if let Some(suppressed) = LIMIT.allow() {
            if suppressed > 0 {
                tracing::warn!("{suppressed} similar messages were suppressed");
            }
            tracing::warn!($($arg)*);
        }
    }};
}

#[cfg(test)]
mod rate_limit_tests {
    use super::LogRateLimit;

    #[test]
    fn a_burst_passes_then_lines_are_counted_until_the_window_ends() {
        let limit = LogRateLimit::new();
        for _ in 0..LogRateLimit::BURST {
            assert_eq!(limit.allow_at(100), Some(0));
        }
        assert_eq!(limit.allow_at(200), None);
        assert_eq!(limit.allow_at(300), None);
        let later = 100 + LogRateLimit::WINDOW_MS;
        assert_eq!(
            limit.allow_at(later),
            Some(2),
            "the next line reports what was dropped"
        );
        assert_eq!(limit.allow_at(later), Some(0));
    }
}
