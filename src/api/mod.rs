//! The HTTP API: Firecracker's REST API over a unix socket.
//!
//! [`start`] binds the socket and starts the `flick_api` thread, which accepts connections and
//! serves each on a connection thread (`server`). Requests are framed by `http`, turned into
//! [`Action`](crate::control::Action)s by `routes` (pure), and sent to the VMM thread through a
//! [`ControlHandle`]; the [`Reply`](crate::control::Reply) becomes the HTTP answer. The API
//! never touches KVM or devices: it imports only `config` and `control`.
//!
//! Deliberate differences from Firecracker's server:
//! - errors of the HTTP layer itself (body over the cap, malformed request) are answered with
//!   `{"fault_message": ...}` like every other error, then the connection is closed;
//! - `Transfer-Encoding` (chunked) bodies are refused with `411 Length Required`;
//! - status lines carry reason phrases, and `Connection: close` is honoured;
//! - paths with extra segments (`/drives/a/b`) are refused instead of ignoring the rest;
//! - `GET /metrics` answers Prometheus text (a flick extension), and Firecracker endpoints flick
//!   lacks (balloon, CPU templates, hotplug) answer 400 saying so;
//! - a connection idle for 30 s, or a request still incomplete 5 s after its first byte, is
//!   closed, so silent clients cannot pile up.

pub mod http;
pub mod metrics;
pub mod routes;
pub mod server;

use std::io;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::control::ControlHandle;
use crate::seccomp::{self, Filter, Role};

/// Where Firecracker listens when `--api-sock` is not given.
pub const DEFAULT_SOCKET_PATH: &str = "/run/firecracker.socket";
/// Firecracker's default cap on request bodies (`--http-api-max-payload-size`).
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 51_200;

/// Why the API could not start.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("socket path {0} already exists")]
    SocketExists(String),
    #[error("cannot bind the API socket {0}")]
    Bind(String, #[source] io::Error),
    #[error("cannot start the API thread")]
    Spawn(#[source] io::Error),
}

/// The running API server. Its socket file is removed by [`ApiServer::cleanup`] and on drop;
/// paths that end the process with `std::process::exit` must call `cleanup` themselves.
#[derive(Debug)]
pub struct ApiServer {
    socket_path: PathBuf,
    shared: Arc<server::Shared>,
}

impl ApiServer {
    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// The API server's request counters as metric samples, for the `metrics_path` file.
    pub fn metrics_source(&self) -> crate::metrics::Source {
        let shared = self.shared.clone();
        Arc::new(move |out: &mut Vec<crate::metrics::Sample>| shared.metrics.samples(out))
    }

    /// Removes the socket file; the API thread stops answering new connections.
    pub fn cleanup(&self) {
        let _ = std::fs::remove_file(&self.socket_path);
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// Binds `socket_path` and starts serving the API on the `flick_api` thread. Refuses a path
/// that already exists, as Firecracker does. `max_payload` caps request bodies in bytes. The
/// thread installs `filter` before it accepts anything; its connection threads inherit it.
pub fn start(
    socket_path: &Path,
    max_payload: usize,
    handle: ControlHandle,
    filter: Option<Filter>,
) -> Result<ApiServer, ApiError> {
    let shown = || socket_path.display().to_string();
    if socket_path.symlink_metadata().is_ok() {
        return Err(ApiError::SocketExists(shown()));
    }
    let listener = UnixListener::bind(socket_path).map_err(|e| match e.kind() {
        io::ErrorKind::AddrInUse => ApiError::SocketExists(shown()),
        _ => ApiError::Bind(shown(), e),
    })?;
    let shared = Arc::new(server::Shared::new(handle, max_payload));
    let server = ApiServer {
        socket_path: socket_path.to_path_buf(),
        shared: shared.clone(),
    };
    std::thread::Builder::new()
        .name("flick_api".into())
        .spawn(move || {
            seccomp::install_or_exit(filter.as_ref(), Role::Api);
            server::accept_loop(listener, shared)
        })
        .map_err(ApiError::Spawn)?;
    Ok(server)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control;

    /// A fresh directory for one test's socket, removed when the test ends.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            let dir = std::env::temp_dir().join(format!("flick-api-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }

        fn socket(&self) -> PathBuf {
            self.0.join("api.sock")
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn existing_socket_path_is_refused() {
        let dir = TempDir::new("exists");
        let path = dir.socket();
        std::fs::write(&path, b"").unwrap();
        let (handle, _control) = control::channel().unwrap();
        let err = start(&path, DEFAULT_MAX_PAYLOAD_BYTES, handle, None).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("socket path {} already exists", path.display())
        );
    }

    #[test]
    fn cleanup_removes_the_socket_file() {
        let dir = TempDir::new("cleanup");
        let path = dir.socket();
        let (handle, _control) = control::channel().unwrap();
        let server = start(&path, DEFAULT_MAX_PAYLOAD_BYTES, handle, None).unwrap();
        assert!(path.exists());
        server.cleanup();
        assert!(!path.exists());
    }

    #[test]
    fn missing_directory_is_a_bind_error() {
        let dir = TempDir::new("missing");
        let path = dir.0.join("no/such/dir/api.sock");
        let (handle, _control) = control::channel().unwrap();
        let err = start(&path, DEFAULT_MAX_PAYLOAD_BYTES, handle, None).unwrap_err();
        assert!(matches!(err, ApiError::Bind(..)));
    }
}
