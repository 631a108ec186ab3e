//! The API threads: `flick_api` accepts connections on the unix socket and hands each to its own
//! short-lived `flick_api_conn` thread (at most [`MAX_CONNECTIONS`] at once), which reads
//! requests, asks the VMM through the [`ControlHandle`] and writes the answers.
//!
//! A silent or slow client only holds its own thread, and only until its read timeout; a client
//! that goes away mid-request is dropped without an answer. Imports `control` and the other
//! `api` modules; never KVM or devices.

use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use super::http::{self, RequestReader, Response, Status};
use super::metrics::ApiMetrics;
use super::routes::{self, Endpoint};
use crate::control::{Action, ControlHandle, ErrorClass, Reply};

/// Connections served at once; more are answered `503` and closed.
pub const MAX_CONNECTIONS: usize = 64;
/// How long a keep-alive connection may sit between requests.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a request may take to arrive once its first byte has.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long writing an answer may block on a client that does not read.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Stack of a connection thread: JSON parsing is shallow (serde_json caps nesting at 128).
const CONNECTION_STACK_BYTES: usize = 256 * 1024;
/// Pause after a failed `accept` (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(20);

/// State shared by the API threads.
#[derive(Debug)]
pub struct Shared {
    pub handle: ControlHandle,
    pub max_payload: usize,
    pub metrics: ApiMetrics,
    open: AtomicUsize,
}

impl Shared {
    pub fn new(handle: ControlHandle, max_payload: usize) -> Shared {
        Shared {
            handle,
            max_payload,
            metrics: ApiMetrics::new(),
            open: AtomicUsize::new(0),
        }
    }
}

/// Accepts connections forever. A run of failures is logged once, when it starts.
pub fn accept_loop(listener: UnixListener, shared: Arc<Shared>) {
    let mut failing = false;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                failing = false;
                admit(stream, &shared);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                if !failing {
                    tracing::warn!("API socket accept failed: {e}");
                }
                failing = true;
                thread::sleep(ACCEPT_BACKOFF);
            }
        }
    }
}

/// Releases a connection slot when its thread ends, however it ends.
struct Slot(Arc<Shared>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

fn admit(stream: UnixStream, shared: &Arc<Shared>) {
    if shared.open.fetch_add(1, Ordering::AcqRel) >= MAX_CONNECTIONS {
        shared.open.fetch_sub(1, Ordering::AcqRel);
        shared.metrics.connection_rejected();
        reject(stream);
        return;
    }
    shared.metrics.connection_opened();
    let slot = Slot(shared.clone());
    let spawned = thread::Builder::new()
        .name("flick_api_conn".into())
        .stack_size(CONNECTION_STACK_BYTES)
        .spawn(move || serve(stream, &slot.0));
    if let Err(e) = spawned {
        // The closure, the stream and the slot were dropped with the error.
        tracing::warn!("cannot start an API connection thread: {e}");
    }
}

/// Tells a client over the connection limit to come back later, without blocking the acceptor.
fn reject(mut stream: UnixStream) {
    let response = Response::fault(Status::ServiceUnavailable, "Too many open connections.");
    if stream.set_nonblocking(true).is_ok() {
        let _ = stream.write_all(&response.encode(false));
    }
}

/// A connection with the read timeouts [`RequestReader`] asks for.
struct Connection {
    stream: UnixStream,
    idle_timeout_set: bool,
}

impl Read for Connection {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream.read(buf)
    }
}

impl Write for Connection {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.stream.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.stream.flush()
    }
}

impl http::Stream for Connection {
    fn set_read_deadline(&mut self, deadline: Option<Instant>) -> io::Result<()> {
        match deadline {
            None if self.idle_timeout_set => Ok(()),
            None => {
                self.idle_timeout_set = true;
                self.stream.set_read_timeout(Some(IDLE_TIMEOUT))
            }
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io::ErrorKind::TimedOut.into());
                }
                self.idle_timeout_set = false;
                self.stream.set_read_timeout(Some(left))
            }
        }
    }
}

/// Serves one connection until the client closes it, asks to, or misbehaves.
pub fn serve(stream: UnixStream, shared: &Shared) {
    if stream.set_write_timeout(Some(WRITE_TIMEOUT)).is_err() {
        return;
    }
    let mut conn = Connection {
        stream,
        idle_timeout_set: false,
    };
    let mut reader = RequestReader::new(shared.max_payload, REQUEST_TIMEOUT);
    loop {
        let request = match reader.read_request(&mut conn) {
            Ok(Some(request)) => request,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!("API connection dropped: {}", crate::error_chain(&e));
                if let Some(response) = e.response() {
                    let status = response.status.code();
                    shared.metrics.count(Endpoint::Other, "other", status);
                    let _ = conn.write_all(&response.encode(false));
                }
                return;
            }
        };
        let started = Instant::now();
        let response = answer(&request, shared);
        let wire = response.encode(request.keep_alive);
        // Counted before the answer leaves, so a client that saw it also sees it counted.
        shared.metrics.record(
            Endpoint::of(&request.path),
            &request.method,
            response.status.code(),
            started.elapsed(),
        );
        let sent = conn.write_all(&wire);
        if sent.is_err() || !request.keep_alive {
            return;
        }
    }
}

/// Routes a request, asks the VMM and turns its reply into a response.
pub fn answer(request: &http::Request, shared: &Shared) -> Response {
    tracing::debug!("API request: {} {}", request.method, request.path);
    let action = match routes::route(&request.method, &request.path, &request.body) {
        Ok(action) => action,
        Err(error) => {
            tracing::debug!("API request refused: {error}");
            return Response::fault(Status::BadRequest, &error.to_string());
        }
    };
    let wants_metrics = matches!(action, Action::GetMetrics);
    match shared.handle.call(action) {
        Reply::Empty => Response::no_content(),
        Reply::Json(body) => Response::json(body),
        Reply::Text(mut body) => {
            if wants_metrics {
                shared.metrics.render(&mut body);
            }
            Response::prometheus(body)
        }
        Reply::Error(error) => {
            let status = match error.class {
                ErrorClass::BadRequest | ErrorClass::NotAllowed => Status::BadRequest,
                ErrorClass::Internal => Status::InternalServerError,
                ErrorClass::TooLarge => Status::PayloadTooLarge,
            };
            Response::fault(status, &error.message)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{self, ActionError, ControlReceiver};

    /// Answers like a VMM that serves `GET /`, `GET /metrics` and `PUT /machine-config` and
    /// refuses everything else.
    fn fake_vmm(control: ControlReceiver) {
        thread::spawn(move || {
            while let Ok(request) = control.receiver.recv() {
                let reply = match request.action {
                    Action::GetInstanceInfo => Reply::Json(r#"{"state":"Not started"}"#.into()),
                    Action::GetMetrics => Reply::Text("vmm_metric 1\n".into()),
                    Action::PutMachineConfig(_) => Reply::Empty,
                    Action::FlushMetrics => Reply::Error(ActionError::internal("disk full")),
                    _ => Reply::Error(ActionError {
                        class: ErrorClass::NotAllowed,
                        message: "refused".into(),
                    }),
                };
                let _ = request.reply.send(reply);
            }
        });
    }

    fn shared() -> Arc<Shared> {
        let (handle, control) = control::channel().unwrap();
        fake_vmm(control);
        Arc::new(Shared::new(handle, 1024))
    }

    fn exchange(shared: &Arc<Shared>, input: &[u8]) -> String {
        let (mut client, server) = UnixStream::pair().unwrap();
        let shared = shared.clone();
        let worker = thread::spawn(move || serve(server, &shared));
        client.write_all(input).unwrap();
        client.shutdown(std::net::Shutdown::Write).unwrap();
        let mut out = String::new();
        client.read_to_string(&mut out).unwrap();
        worker.join().unwrap();
        out
    }

    fn request(method: &str, path: &str, body: &str) -> http::Request {
        http::Request {
            method: method.into(),
            path: path.into(),
            body: body.as_bytes().to_vec(),
            keep_alive: true,
        }
    }

    #[test]
    fn vmm_json_reply_becomes_200() {
        let response = answer(&request("GET", "/", ""), &shared());
        assert_eq!(response.status, Status::Ok);
        assert_eq!(
            response.body.unwrap().1,
            r#"{"state":"Not started"}"#.to_string()
        );
    }

    #[test]
    fn vmm_empty_reply_becomes_204() {
        let body = r#"{"vcpu_count": 1, "mem_size_mib": 64}"#;
        let response = answer(&request("PUT", "/machine-config", body), &shared());
        assert_eq!(response, Response::no_content());
    }

    #[test]
    fn vmm_error_reply_becomes_400_with_fault_message() {
        let response = answer(
            &request("PATCH", "/vm", r#"{"state": "Paused"}"#),
            &shared(),
        );
        assert_eq!(response, Response::fault(Status::BadRequest, "refused"));
    }

    #[test]
    fn vmm_internal_failure_becomes_500_with_fault_message() {
        let response = answer(
            &request("PUT", "/actions", r#"{"action_type": "FlushMetrics"}"#),
            &shared(),
        );
        assert_eq!(
            response,
            Response::fault(Status::InternalServerError, "disk full")
        );
    }

    #[test]
    fn routing_error_never_reaches_the_vmm() {
        let (handle, _control) = control::channel().unwrap();
        let shared = Shared::new(handle, 1024);
        let response = answer(&request("GET", "/nope", ""), &shared);
        assert_eq!(response.status, Status::BadRequest);
    }

    #[test]
    fn metrics_reply_is_followed_by_api_metrics() {
        let shared = shared();
        shared
            .metrics
            .record(Endpoint::Root, "GET", 200, Duration::from_micros(10));
        let response = answer(&request("GET", "/metrics", ""), &shared);
        let (_, body) = response.body.unwrap();
        assert!(body.starts_with("vmm_metric 1\n"));
        assert!(
            body.contains("flick_api_requests_total{path=\"/\",method=\"GET\",status=\"200\"} 1")
        );
    }

    #[test]
    fn keep_alive_connection_answers_every_request_in_order() {
        let out = exchange(
            &shared(),
            b"GET / HTTP/1.1\r\n\r\nGET /nope HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\n\r\n",
        );
        let statuses: Vec<&str> = out.split("HTTP/1.1 ").skip(1).map(|s| &s[..3]).collect();
        assert_eq!(statuses, ["200", "400", "200"]);
    }

    #[test]
    fn connection_close_stops_after_one_answer() {
        let out = exchange(
            &shared(),
            b"GET / HTTP/1.1\r\nConnection: close\r\n\r\nGET / HTTP/1.1\r\n\r\n",
        );
        assert_eq!(out.matches("HTTP/1.1 200 OK").count(), 1);
        assert!(out.contains("Connection: close\r\n"));
    }

    #[test]
    fn oversized_body_is_answered_400_and_closed() {
        let out = exchange(
            &shared(),
            b"PUT /machine-config HTTP/1.1\r\nContent-Length: 2048\r\n\r\n{}",
        );
        assert!(out.starts_with("HTTP/1.1 400 Bad Request\r\n"));
        assert!(out.contains("Connection: close\r\n"));
        assert!(out.contains(
            "Request payload with size 2048 is larger than the limit of 1024 allowed by server."
        ));
    }

    #[test]
    fn malformed_request_is_answered_400_and_closed() {
        let out = exchange(&shared(), b"GARBAGE\x01\r\n\r\n");
        assert!(out.starts_with("HTTP/1.1 400 Bad Request\r\n"));
        assert!(out.contains("fault_message"));
    }

    #[test]
    fn client_gone_mid_request_gets_no_answer() {
        let out = exchange(
            &shared(),
            b"PUT /machine-config HTTP/1.1\r\nContent-Length: 20\r\n\r\n{",
        );
        assert!(out.is_empty());
    }

    #[test]
    fn expect_continue_gets_an_interim_answer_first() {
        let (mut client, server) = UnixStream::pair().unwrap();
        let shared = shared();
        let worker = thread::spawn(move || serve(server, &shared));
        let body = r#"{"vcpu_count": 1, "mem_size_mib": 64}"#;
        write!(
            client,
            "PUT /machine-config HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .unwrap();
        let mut interim = [0u8; 25];
        client.read_exact(&mut interim).unwrap();
        client.write_all(body.as_bytes()).unwrap();
        client.shutdown(std::net::Shutdown::Write).unwrap();
        let mut rest = String::new();
        client.read_to_string(&mut rest).unwrap();
        worker.join().unwrap();
        assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
        assert!(rest.starts_with("HTTP/1.1 204 No Content\r\n"));
    }
}
