//! HTTP/1.1 framing for the API socket: reading requests (request line and headers through
//! `httparse`, `Content-Length` bodies, `Expect: 100-continue`, keep-alive) and encoding responses.
//!
//! Pure protocol logic over any [`Stream`]; it opens no socket and starts no thread, so it is unit
//! tested with in-memory streams. Runs on the API connection threads. Imports nothing from the
//! crate.

use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

/// Largest request line plus headers accepted, in bytes.
pub const MAX_HEAD_BYTES: usize = 8192;
/// Largest number of header fields in one request.
const MAX_HEADERS: usize = 32;
/// Bytes asked of the stream per read.
const READ_CHUNK_BYTES: usize = 4096;
/// Interim response that lets a client waiting on `Expect: 100-continue` send its body.
const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// What the framing code needs from a connection: bytes in and out, and a read timeout that
/// follows the request being read.
pub trait Stream: Read + Write {
    /// Bounds the next read: `None` while waiting between requests (the idle limit), or the
    /// deadline of the request in progress.
    fn set_read_deadline(&mut self, deadline: Option<Instant>) -> io::Result<()>;
}

/// One complete request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// Absolute path, without scheme, authority or query.
    pub path: String,
    /// Empty when the request had no body.
    pub body: Vec<u8>,
    /// Whether the connection stays open after the response.
    pub keep_alive: bool,
}

/// Why no request could be read. Some of these deserve an answer before the connection closes.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("the client closed the connection in the middle of a request")]
    Closed,
    #[error("cannot read from the connection")]
    Io(#[source] io::Error),
    #[error("Invalid HTTP request: {0}.")]
    Malformed(String),
    #[error("Request headers are larger than the limit of {MAX_HEAD_BYTES} bytes.")]
    HeadTooLarge,
    #[error(
        "Request payload with size {size} is larger than the limit of {limit} allowed by server."
    )]
    PayloadTooLarge { size: u64, limit: usize },
    #[error("Transfer-Encoding is not supported: send the body with a Content-Length header.")]
    LengthRequired,
}

impl HttpError {
    /// The answer to send before closing the connection; `None` when the client is gone.
    pub fn response(&self) -> Option<Response> {
        match self {
            HttpError::Closed | HttpError::Io(_) => None,
            HttpError::LengthRequired => {
                Some(Response::fault(Status::LengthRequired, &self.to_string()))
            }
            _ => Some(Response::fault(Status::BadRequest, &self.to_string())),
        }
    }
}

/// What the request line and headers said.
#[derive(Debug)]
struct Head {
    len: usize,
    method: String,
    path: String,
    content_length: Option<u64>,
    expect_continue: bool,
    keep_alive: bool,
}

/// Reads requests one after another from a connection, keeping bytes that arrived early
/// (pipelined requests) for the next call.
#[derive(Debug)]
pub struct RequestReader {
    buf: Vec<u8>,
    max_payload: usize,
    request_timeout: Duration,
}

impl RequestReader {
    /// `max_payload` caps bodies; `request_timeout` bounds the time from a request's first
    /// byte to its last.
    pub fn new(max_payload: usize, request_timeout: Duration) -> RequestReader {
        RequestReader {
            buf: Vec::new(),
            max_payload,
            request_timeout,
        }
    }

    /// Reads the next request. `Ok(None)` means the client closed the connection between
    /// requests. Sends `100 Continue` when the client asked for it and the body is still to come.
    pub fn read_request<S: Stream>(
        &mut self,
        stream: &mut S,
    ) -> Result<Option<Request>, HttpError> {
        let mut deadline = None;
        let head = loop {
            if !self.buf.is_empty() {
                if let Some(head) = parse_head(&self.buf)? {
                    break head;
                }
                if self.buf.len() >= MAX_HEAD_BYTES {
                    return Err(HttpError::HeadTooLarge);
                }
            }
            if self.fill(stream, &mut deadline, READ_CHUNK_BYTES)? == 0 {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                return Err(HttpError::Closed);
            }
        };

        let body_len = head.content_length.unwrap_or(0);
        let too_large = HttpError::PayloadTooLarge {
            size: body_len,
            limit: self.max_payload,
        };
        let total = match usize::try_from(body_len) {
            Ok(len) if len <= self.max_payload => head.len.checked_add(len).ok_or(too_large)?,
            _ => return Err(too_large),
        };
        if head.expect_continue && self.buf.len() < total {
            stream.write_all(CONTINUE).map_err(HttpError::Io)?;
        }
        while self.buf.len() < total {
            let want = total - self.buf.len();
            if self.fill(stream, &mut deadline, want)? == 0 {
                return Err(HttpError::Closed);
            }
        }
        let body = self.buf[head.len..total].to_vec();
        self.buf.drain(..total);
        Ok(Some(Request {
            method: head.method,
            path: head.path,
            body,
            keep_alive: head.keep_alive,
        }))
    }

    /// Reads up to `want` more bytes into the buffer; returns how many arrived (0 at EOF).
    fn fill<S: Stream>(
        &mut self,
        stream: &mut S,
        deadline: &mut Option<Instant>,
        want: usize,
    ) -> Result<usize, HttpError> {
        let bound = if self.buf.is_empty() {
            None
        } else {
            Some(*deadline.get_or_insert_with(|| Instant::now() + self.request_timeout))
        };
        stream.set_read_deadline(bound).map_err(HttpError::Io)?;
        let start = self.buf.len();
        self.buf.resize(start + want.min(READ_CHUNK_BYTES * 4), 0);
        let result = loop {
            match stream.read(&mut self.buf[start..]) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other,
            }
        };
        let n = *result.as_ref().unwrap_or(&0);
        self.buf.truncate(start + n);
        result.map_err(HttpError::Io)
    }
}

/// Parses the request line and headers once they are complete.
fn parse_head(buf: &[u8]) -> Result<Option<Head>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(HttpError::Malformed(format!(
                "more than {MAX_HEADERS} header fields"
            )))
        }
        Err(e) => return Err(HttpError::Malformed(e.to_string())),
    };
    let method = req.method.unwrap_or_default().to_string();
    let http11 = req.version == Some(1);
    let mut content_length = None;
    let mut expect_continue = false;
    let mut close = !http11;
    for header in req.headers.iter() {
        let name = header.name;
        let value = std::str::from_utf8(header.value)
            .map_err(|_| HttpError::Malformed(format!("header {name} is not valid text")))?
            .trim();
        if name.eq_ignore_ascii_case("content-length") {
            let parsed = parse_content_length(value)?;
            if content_length.is_some_and(|other| other != parsed) {
                return Err(HttpError::Malformed(
                    "conflicting Content-Length headers".into(),
                ));
            }
            content_length = Some(parsed);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(HttpError::LengthRequired);
        } else if name.eq_ignore_ascii_case("expect") {
            expect_continue = value.eq_ignore_ascii_case("100-continue");
        } else if name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    close = true;
                } else if token.eq_ignore_ascii_case("keep-alive") {
                    close = false;
                }
            }
        }
    }
    // A PUT or PATCH without Content-Length has no body by the rules, but a client that sent one
    // anyway would have its body read as the next request: answer, then close.
    if content_length.is_none() && (method == "PUT" || method == "PATCH") {
        close = true;
    }
    Ok(Some(Head {
        len,
        path: request_path(req.path.unwrap_or_default()),
        method,
        content_length,
        expect_continue: expect_continue && http11,
        keep_alive: !close,
    }))
}

fn parse_content_length(value: &str) -> Result<u64, HttpError> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(HttpError::Malformed(format!(
            "invalid Content-Length {value:?}"
        )));
    }
    value
        .parse()
        .map_err(|_| HttpError::Malformed(format!("invalid Content-Length {value:?}")))
}

/// The path of a request target: `http://localhost/x?y` and `/x?y` both give `/x`.
fn request_path(target: &str) -> String {
    let mut path = target;
    for scheme in ["http://", "https://"] {
        if let Some(rest) = target.strip_prefix(scheme) {
            path = rest.find('/').map_or("/", |i| &rest[i..]);
        }
    }
    let end = path.find(['?', '#']).unwrap_or(path.len());
    path[..end].to_string()
}

/// Response status codes the API uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    NoContent,
    BadRequest,
    LengthRequired,
    PayloadTooLarge,
    InternalServerError,
    ServiceUnavailable,
}

impl Status {
    pub fn code(self) -> u16 {
        match self {
            Status::Ok => 200,
            Status::NoContent => 204,
            Status::BadRequest => 400,
            Status::LengthRequired => 411,
            Status::PayloadTooLarge => 413,
            Status::InternalServerError => 500,
            Status::ServiceUnavailable => 503,
        }
    }

    fn reason(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::NoContent => "No Content",
            Status::BadRequest => "Bad Request",
            Status::LengthRequired => "Length Required",
            Status::PayloadTooLarge => "Payload Too Large",
            Status::InternalServerError => "Internal Server Error",
            Status::ServiceUnavailable => "Service Unavailable",
        }
    }
}

/// Media type of a response body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentType {
    Json,
    /// Prometheus text exposition format.
    Prometheus,
}

impl ContentType {
    fn as_str(self) -> &'static str {
        match self {
            ContentType::Json => "application/json",
            ContentType::Prometheus => "text/plain; version=0.0.4",
        }
    }
}

/// A response about to be sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: Status,
    pub body: Option<(ContentType, String)>,
}

impl Response {
    pub fn no_content() -> Response {
        Response {
            status: Status::NoContent,
            body: None,
        }
    }

    pub fn json(body: String) -> Response {
        Response {
            status: Status::Ok,
            body: Some((ContentType::Json, body)),
        }
    }

    pub fn prometheus(body: String) -> Response {
        Response {
            status: Status::Ok,
            body: Some((ContentType::Prometheus, body)),
        }
    }

    /// An error answer: `{"fault_message": message}`.
    pub fn fault(status: Status, message: &str) -> Response {
        let body = serde_json::json!({ "fault_message": message }).to_string();
        Response {
            status,
            body: Some((ContentType::Json, body)),
        }
    }

    /// The bytes on the wire. `204` carries no `Content-Length` (RFC 9110 forbids it); every
    /// other response does.
    pub fn encode(&self, keep_alive: bool) -> Vec<u8> {
        let connection = if keep_alive { "keep-alive" } else { "close" };
        let body = self.body.as_ref().map_or("", |(_, text)| text.as_str());
        let mut out = Vec::with_capacity(160 + body.len());
        // Writing to a Vec cannot fail.
        let _ = write!(
            out,
            "HTTP/1.1 {} {}\r\nServer: Firecracker API\r\nConnection: {connection}\r\n",
            self.status.code(),
            self.status.reason()
        );
        if let Some((content_type, _)) = &self.body {
            let _ = write!(out, "Content-Type: {}\r\n", content_type.as_str());
        }
        if self.status != Status::NoContent {
            let _ = write!(out, "Content-Length: {}\r\n", body.len());
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(body.as_bytes());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// In-memory connection: `input` arrives in the given pieces, writes are recorded along with
    /// how many pieces had been read when they happened.
    struct Script {
        pieces: Vec<Vec<u8>>,
        next: usize,
        written: Vec<u8>,
        writes_after_piece: Vec<usize>,
    }

    impl Script {
        fn new(pieces: &[&[u8]]) -> Script {
            Script {
                pieces: pieces.iter().map(|p| p.to_vec()).collect(),
                next: 0,
                written: Vec::new(),
                writes_after_piece: Vec::new(),
            }
        }
    }

    impl Read for Script {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let Some(piece) = self.pieces.get_mut(self.next) else {
                return Ok(0);
            };
            let n = piece.len().min(buf.len());
            buf[..n].copy_from_slice(&piece[..n]);
            piece.drain(..n);
            if piece.is_empty() {
                self.next += 1;
            }
            Ok(n)
        }
    }

    impl Write for Script {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.written.extend_from_slice(buf);
            self.writes_after_piece.push(self.next);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Stream for Script {
        fn set_read_deadline(&mut self, _: Option<Instant>) -> io::Result<()> {
            Ok(())
        }
    }

    fn reader() -> RequestReader {
        RequestReader::new(51_200, Duration::from_secs(5))
    }

    fn read_one(pieces: &[&[u8]]) -> Result<Option<Request>, HttpError> {
        reader().read_request(&mut Script::new(pieces))
    }

    #[test]
    fn get_without_body_is_read_with_keep_alive_by_default() {
        let req = read_one(&[b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"])
            .unwrap()
            .unwrap();
        assert_eq!(req.method, "GET");
        assert_eq!(req.path, "/");
        assert!(req.body.is_empty());
        assert!(req.keep_alive);
    }

    #[test]
    fn connection_close_ends_keep_alive() {
        let req = read_one(&[b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n"])
            .unwrap()
            .unwrap();
        assert!(!req.keep_alive);
    }

    #[test]
    fn http10_closes_unless_keep_alive_is_asked() {
        let plain = read_one(&[b"GET / HTTP/1.0\r\n\r\n"]).unwrap().unwrap();
        let asked = read_one(&[b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"])
            .unwrap()
            .unwrap();
        assert!(!plain.keep_alive);
        assert!(asked.keep_alive);
    }

    #[test]
    fn body_split_over_several_reads_is_assembled() {
        let req = read_one(&[
            b"PUT /actions HTTP/1.1\r\nContent-Len",
            b"gth: 11\r\n\r\n{\"a\":",
            b" 1234}",
        ])
        .unwrap()
        .unwrap();
        assert_eq!(req.body, b"{\"a\": 1234}");
    }

    #[test]
    fn pipelined_requests_are_read_in_order() {
        let mut stream = Script::new(&[
            b"PUT /a HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}GET /b HTTP/1.1\r\n\r\n",
        ]);
        let mut reader = reader();
        let first = reader.read_request(&mut stream).unwrap().unwrap();
        let second = reader.read_request(&mut stream).unwrap().unwrap();
        let end = reader.read_request(&mut stream).unwrap();
        assert_eq!(
            (first.path.as_str(), first.body.as_slice()),
            ("/a", &b"{}"[..])
        );
        assert_eq!(second.path, "/b");
        assert!(end.is_none());
    }

    #[test]
    fn expect_continue_is_answered_before_the_body_is_read() {
        let mut stream = Script::new(&[
            b"PUT /boot-source HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n",
            b"{}",
        ]);
        let req = reader().read_request(&mut stream).unwrap().unwrap();
        assert_eq!(req.body, b"{}");
        assert_eq!(stream.written, CONTINUE);
        assert_eq!(stream.writes_after_piece, vec![1]);
    }

    #[test]
    fn expect_continue_is_not_answered_when_the_body_already_arrived() {
        let mut stream = Script::new(&[
            b"PUT /x HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n{}",
        ]);
        reader().read_request(&mut stream).unwrap().unwrap();
        assert!(stream.written.is_empty());
    }

    #[test]
    fn oversized_body_is_refused_without_continue() {
        let mut stream = Script::new(&[
            b"PUT /x HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 51201\r\n\r\n",
        ]);
        let err = reader().read_request(&mut stream).unwrap_err();
        assert!(matches!(
            err,
            HttpError::PayloadTooLarge {
                size: 51201,
                limit: 51200
            }
        ));
        assert!(stream.written.is_empty());
        assert_eq!(err.response().unwrap().status, Status::BadRequest);
    }

    #[test]
    fn huge_content_length_with_unlimited_cap_is_refused_not_overflowed() {
        let mut reader = RequestReader::new(usize::MAX, Duration::from_secs(5));
        let mut stream =
            Script::new(&[b"PUT /x HTTP/1.1\r\nContent-Length: 18446744073709551615\r\n\r\n"]);
        let err = reader.read_request(&mut stream).unwrap_err();
        assert!(matches!(err, HttpError::PayloadTooLarge { .. }));
    }

    #[test]
    fn body_at_the_cap_is_accepted() {
        let mut reader = RequestReader::new(4, Duration::from_secs(5));
        let mut stream = Script::new(&[b"PUT /x HTTP/1.1\r\nContent-Length: 4\r\n\r\nabcd"]);
        let req = reader.read_request(&mut stream).unwrap().unwrap();
        assert_eq!(req.body, b"abcd");
    }

    #[test]
    fn chunked_body_is_refused_with_411() {
        let err = read_one(&[b"PUT /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n"])
            .unwrap_err();
        assert!(matches!(err, HttpError::LengthRequired));
        assert_eq!(err.response().unwrap().status, Status::LengthRequired);
    }

    #[test]
    fn put_without_content_length_has_no_body_and_closes() {
        let req = read_one(&[b"PUT /actions HTTP/1.1\r\n\r\n{\"action_type\": \"InstanceStart\"}"])
            .unwrap()
            .unwrap();
        assert!(req.body.is_empty());
        assert!(!req.keep_alive);
    }

    #[test]
    fn malformed_request_line_is_a_bad_request() {
        let err = read_one(&[b"GET /\x01 HTTP/1.1\r\n\r\n"]).unwrap_err();
        assert!(matches!(err, HttpError::Malformed(_)));
        assert_eq!(err.response().unwrap().status, Status::BadRequest);
    }

    #[test]
    fn unknown_http_version_is_a_bad_request() {
        let err = read_one(&[b"PRI * HTTP/2.0\r\n\r\n"]).unwrap_err();
        assert!(matches!(err, HttpError::Malformed(_)));
    }

    #[test]
    fn invalid_content_length_is_a_bad_request() {
        let err = read_one(&[b"PUT /x HTTP/1.1\r\nContent-Length: -1\r\n\r\n"]).unwrap_err();
        assert!(matches!(err, HttpError::Malformed(m) if m.contains("Content-Length")));
    }

    #[test]
    fn conflicting_content_lengths_are_a_bad_request() {
        let err = read_one(&[b"PUT /x HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n"])
            .unwrap_err();
        assert!(matches!(err, HttpError::Malformed(_)));
    }

    #[test]
    fn endless_headers_are_refused() {
        let mut head = b"GET / HTTP/1.1\r\n".to_vec();
        head.extend(std::iter::repeat_n(b'a', MAX_HEAD_BYTES));
        let err = read_one(&[&head]).unwrap_err();
        assert!(matches!(err, HttpError::HeadTooLarge));
    }

    #[test]
    fn eof_between_requests_is_a_clean_close() {
        assert!(read_one(&[]).unwrap().is_none());
    }

    #[test]
    fn eof_in_the_middle_of_a_request_is_an_error_without_answer() {
        let head = read_one(&[b"GET / HTTP/1.1\r\nHost"]).unwrap_err();
        let body = read_one(&[b"PUT /x HTTP/1.1\r\nContent-Length: 5\r\n\r\n{}"]).unwrap_err();
        assert!(matches!(head, HttpError::Closed));
        assert!(matches!(body, HttpError::Closed));
        assert!(body.response().is_none());
    }

    #[test]
    fn absolute_form_and_query_are_reduced_to_the_path() {
        let abs = read_one(&[b"GET http://localhost/machine-config?x=1 HTTP/1.1\r\n\r\n"])
            .unwrap()
            .unwrap();
        let bare = read_one(&[b"GET http://localhost HTTP/1.1\r\n\r\n"])
            .unwrap()
            .unwrap();
        assert_eq!(abs.path, "/machine-config");
        assert_eq!(bare.path, "/");
    }

    #[test]
    fn no_content_response_has_no_length_or_type() {
        let wire = Response::no_content().encode(true);
        assert_eq!(
            wire,
            b"HTTP/1.1 204 No Content\r\nServer: Firecracker API\r\nConnection: keep-alive\r\n\r\n"
        );
    }

    #[test]
    fn json_response_carries_type_and_length() {
        let wire = String::from_utf8(Response::json("{}".into()).encode(false)).unwrap();
        assert!(wire.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(wire.contains("Connection: close\r\n"));
        assert!(wire.contains("Content-Type: application/json\r\n"));
        assert!(wire.ends_with("Content-Length: 2\r\n\r\n{}"));
    }

    #[test]
    fn prometheus_response_has_its_content_type() {
        let wire = String::from_utf8(Response::prometheus("a 1\n".into()).encode(true)).unwrap();
        assert!(wire.contains("Content-Type: text/plain; version=0.0.4\r\n"));
    }

    #[test]
    fn fault_message_is_json_escaped() {
        let response = Response::fault(Status::BadRequest, "bad \"id\"\nnext");
        let (_, body) = response.body.unwrap();
        let value: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(value["fault_message"], "bad \"id\"\nnext");
    }
}
