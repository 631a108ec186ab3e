//! The guest side of MMDS over HTTP/1.x: one request's bytes in, the response's bytes out.
//!
//! `GET <path>` returns the value at that path (JSON with `Accept: application/json`, IMDS text
//! otherwise or with `imds_compat`); V2 requires a valid `X-metadata-token` (V1 accepts requests
//! with or without one). `PUT /latest/api/token` with `X-metadata-token-ttl-seconds` issues a
//! session token. Other methods get 405. Status codes and messages follow Firecracker's. Pure
//! functions on a locked store; the TCP side is in [`super::stack`].

use super::{Mmds, MmdsError, OutputFormat};
use crate::config::MmdsVersion;

/// Largest request (head and body) a connection may send.
pub const MAX_REQUEST_BYTES: usize = 4096;
const MAX_HEADERS: usize = 32;
const TOKEN_PATH: &str = "/latest/api/token";
const TOKEN_HEADERS: [&str; 2] = ["x-metadata-token", "x-aws-ec2-metadata-token"];
const TTL_HEADERS: [&str; 2] = [
    "x-metadata-token-ttl-seconds",
    "x-aws-ec2-metadata-token-ttl-seconds",
];
const NO_TOKEN: &str = "No MMDS token provided. Use `X-metadata-token` or \
                        `X-aws-ec2-metadata-token` header to specify the session token.";
const NO_TTL: &str = "Token time to live value not found. Use `X-metadata-token-ttl-seconds` or \
                      `X-aws-ec2-metadata-token-ttl-seconds` header to specify the token's \
                      lifetime.";

/// What a connection's buffered bytes amount to.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Not a whole request yet.
    Incomplete,
    /// A request was answered: it took `consumed` bytes; close the connection after
    /// `response` when `close` is set.
    Answered {
        consumed: usize,
        response: Vec<u8>,
        close: bool,
    },
}

/// A response before it is encoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    fn text(status: u16, body: impl Into<String>) -> Self {
        Response {
            status,
            content_type: "text/plain",
            headers: Vec::new(),
            body: body.into(),
        }
    }

    /// The response's bytes for an HTTP/1.`minor` client.
    pub fn encode(&self, minor: u8, close: bool) -> Vec<u8> {
        let mut head = format!(
            "HTTP/1.{minor} {} {}\r\nServer: flick\r\nContent-Type: {}\r\n",
            self.status,
            reason(self.status),
            self.content_type
        );
        for (name, value) in &self.headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str(&format!("Content-Length: {}\r\n", self.body.len()));
        if close {
            head.push_str("Connection: close\r\n");
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(self.body.as_bytes());
        bytes
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Payload Too Large",
        501 => "Not Implemented",
        _ => "",
    }
}

/// The answer when a response would be larger than a connection may hold.
pub fn too_large() -> Vec<u8> {
    Response::text(413, "The MMDS response is too large.").encode(1, true)
}

fn bad_request(body: &str, buf: &[u8]) -> Parsed {
    Parsed::Answered {
        consumed: buf.len(),
        response: Response::text(400, body).encode(1, true),
        close: true,
    }
}

fn header<'h>(headers: &'h [httparse::Header<'_>], names: &[&str]) -> Option<(&'h str, String)> {
    headers.iter().find_map(|h| {
        names
            .iter()
            .any(|n| h.name.eq_ignore_ascii_case(n))
            .then(|| (h.name, String::from_utf8_lossy(h.value).trim().to_string()))
    })
}

/// Parses the request at the start of `buf` and answers it from `mmds`.
pub fn serve(mmds: &mut Mmds, buf: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let head_len = match request.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() < MAX_REQUEST_BYTES => {
            return Parsed::Incomplete
        }
        Ok(httparse::Status::Partial) => return bad_request("Request too large.", buf),
        Err(e) => return bad_request(&format!("Invalid request: {e}."), buf),
    };
    let body_len = match header(request.headers, &["content-length"]) {
        None => 0,
        Some((_, value)) => match value.parse::<usize>() {
            Ok(n) => n,
            Err(_) => {
                let message = format!("Invalid value. Key:Content-Length; Value:{value}");
                return bad_request(&message, buf);
            }
        },
    };
    if header(request.headers, &["transfer-encoding"]).is_some() {
        return bad_request("Transfer-Encoding is not supported.", buf);
    }
    let total = head_len.saturating_add(body_len);
    if total > MAX_REQUEST_BYTES {
        return bad_request("Request too large.", buf);
    }
    if buf.len() < total {
        return Parsed::Incomplete;
    }
    let minor = request.version.unwrap_or(1);
    let connection = header(request.headers, &["connection"]).map(|(_, v)| v.to_ascii_lowercase());
    let close = match connection.as_deref() {
        Some("close") => true,
        Some("keep-alive") => false,
        _ => minor == 0,
    };
    let method = request.method.unwrap_or("");
    let target = request.path.unwrap_or("");
    let response = respond(mmds, method, target, request.headers);
    Parsed::Answered {
        consumed: total,
        response: response.encode(minor, close),
        close,
    }
}

/// The path of a request target (`/a/b` or `http://host/a/b`), without query or fragment.
fn abs_path(target: &str) -> &str {
    let path = match target.strip_prefix("http://") {
        Some(rest) => rest.find('/').map_or("", |i| &rest[i..]),
        None => target,
    };
    path.split(['?', '#']).next().unwrap_or("")
}

/// Folds repeated slashes: `//a///b` → `/a/b`.
fn sanitize(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for c in path.chars() {
        if !(c == '/' && out.ends_with('/')) {
            out.push(c);
        }
    }
    out
}

fn respond(
    mmds: &mut Mmds,
    method: &str,
    target: &str,
    headers: &[httparse::Header<'_>],
) -> Response {
    let uri = abs_path(target);
    if !uri.starts_with('/') {
        return Response::text(400, "Invalid URI.");
    }
    match method {
        "GET" => get(mmds, uri, headers),
        "PUT" => put(mmds, uri, headers),
        _ => {
            let mut response = Response::text(405, "Not allowed HTTP method.");
            response.headers.push(("Allow".into(), "GET, PUT".into()));
            response
        }
    }
}

fn get(mmds: &mut Mmds, uri: &str, headers: &[httparse::Header<'_>]) -> Response {
    let token = header(headers, &TOKEN_HEADERS).map(|(_, v)| v);
    if mmds.version() == MmdsVersion::V2 {
        match token {
            None => return Response::text(401, NO_TOKEN),
            Some(t) if !mmds.token_is_valid(&t) => {
                return Response::text(401, "MMDS token not valid.")
            }
            Some(_) => {}
        }
    }
    let json = header(headers, &["accept"]).is_some_and(|(_, v)| v == "application/json");
    let format = if json {
        OutputFormat::Json
    } else {
        OutputFormat::Imds
    };
    match mmds.get(&sanitize(uri), format) {
        Ok(body) => Response {
            status: 200,
            content_type: if json && !mmds.imds_compat() {
                "application/json"
            } else {
                "text/plain"
            },
            headers: Vec::new(),
            body,
        },
        Err(MmdsError::UnsupportedValueType) => {
            Response::text(501, MmdsError::UnsupportedValueType.to_string())
        }
        Err(_) => Response::text(404, format!("Resource not found: {uri}.")),
    }
}

fn put(mmds: &mut Mmds, uri: &str, headers: &[httparse::Header<'_>]) -> Response {
    if let Some((name, _)) = header(headers, &["x-forwarded-for"]) {
        return Response::text(400, format!("Unsupported header name. Key: {name}"));
    }
    if sanitize(uri) != TOKEN_PATH {
        return Response::text(404, format!("Resource not found: {uri}."));
    }
    let Some((name, value)) = header(headers, &TTL_HEADERS) else {
        return Response::text(400, NO_TTL);
    };
    let Ok(ttl) = value.parse::<u32>() else {
        return Response::text(400, format!("Invalid value. Key:{name}; Value:{value}"));
    };
    match mmds.issue_token(ttl) {
        Ok(token) => Response {
            status: 200,
            content_type: "text/plain",
            headers: vec![(name.to_string(), ttl.to_string())],
            body: token,
        },
        Err(e) => Response::text(400, e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn store(version: MmdsVersion) -> Mmds {
        let mut mmds = Mmds::default();
        mmds.put(json!({"latest": {"meta-data": {"ami-id": "ami-1", "age": 4}}}))
            .unwrap();
        mmds.configure(version, false);
        mmds
    }

    /// Status line and body of the answer to `request`.
    fn ask(mmds: &mut Mmds, request: &str) -> (String, String) {
        let Parsed::Answered { response, .. } = serve(mmds, request.as_bytes()) else {
            panic!("incomplete: {request}");
        };
        let text = String::from_utf8(response).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        (head.lines().next().unwrap().to_string(), body.to_string())
    }

    #[test]
    fn v1_get_returns_imds_text_by_default_and_json_on_request() {
        let mut mmds = store(MmdsVersion::V1);
        let (status, body) = ask(&mut mmds, "GET /latest/meta-data HTTP/1.1\r\n\r\n");
        assert_eq!(
            (status.as_str(), body.as_str()),
            ("HTTP/1.1 200 OK", "age\nami-id")
        );
        let (_, json) = ask(
            &mut mmds,
            "GET //latest//meta-data/ami-id HTTP/1.1\r\nAccept: application/json\r\n\r\n",
        );
        assert_eq!(json, r#""ami-1""#);
        let (_, root) = ask(&mut mmds, "GET http://169.254.169.254/ HTTP/1.0\r\n\r\n");
        assert_eq!(root, "latest/");
    }

    #[test]
    fn missing_paths_and_unsupported_values_get_404_and_501() {
        let mut mmds = store(MmdsVersion::V1);
        let (status, body) = ask(&mut mmds, "GET /nope HTTP/1.1\r\n\r\n");
        assert_eq!(status, "HTTP/1.1 404 Not Found");
        assert_eq!(body, "Resource not found: /nope.");
        let (status, _) = ask(&mut mmds, "GET /latest/meta-data/age HTTP/1.1\r\n\r\n");
        assert_eq!(status, "HTTP/1.1 501 Not Implemented");
    }

    #[test]
    fn v2_needs_a_valid_token_from_put() {
        let mut mmds = store(MmdsVersion::V2);
        let get = "GET /latest/meta-data/ami-id HTTP/1.1\r\n";
        let (status, body) = ask(&mut mmds, &format!("{get}\r\n"));
        assert_eq!(
            (status.as_str(), body.as_str()),
            ("HTTP/1.1 401 Unauthorized", NO_TOKEN)
        );
        let (status, _) = ask(&mut mmds, &format!("{get}X-metadata-token: forged\r\n\r\n"));
        assert_eq!(status, "HTTP/1.1 401 Unauthorized");

        let put = "PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 60\r\n\r\n";
        let (status, token) = ask(&mut mmds, put);
        assert_eq!(status, "HTTP/1.1 200 OK");
        let (status, body) = ask(
            &mut mmds,
            &format!("{get}X-metadata-token: {token}\r\n\r\n"),
        );
        assert_eq!(
            (status.as_str(), body.as_str()),
            ("HTTP/1.1 200 OK", "ami-1")
        );
    }

    #[test]
    fn v1_accepts_requests_without_or_with_a_bad_token() {
        let mut mmds = store(MmdsVersion::V1);
        let (status, _) = ask(
            &mut mmds,
            "GET /latest HTTP/1.1\r\nX-aws-ec2-metadata-token: nope\r\n\r\n",
        );
        assert_eq!(status, "HTTP/1.1 200 OK");
    }

    #[test]
    fn token_requests_are_checked() {
        let mut mmds = store(MmdsVersion::V2);
        let token = "PUT /latest/api/token HTTP/1.1\r\n";
        let (status, body) = ask(&mut mmds, &format!("{token}\r\n"));
        assert_eq!(
            (status.as_str(), body.as_str()),
            ("HTTP/1.1 400 Bad Request", NO_TTL)
        );
        let (_, body) = ask(
            &mut mmds,
            &format!("{token}X-metadata-token-ttl-seconds: 0\r\n\r\n"),
        );
        assert!(
            body.starts_with("Invalid time to live value provided for token: 0."),
            "{body}"
        );
        let (_, body) = ask(
            &mut mmds,
            &format!("{token}X-metadata-token-ttl-seconds: x\r\n\r\n"),
        );
        assert_eq!(
            body,
            "Invalid value. Key:X-metadata-token-ttl-seconds; Value:x"
        );
        let forwarded =
            format!("{token}X-Forwarded-For: 1.2.3.4\r\nX-metadata-token-ttl-seconds: 5\r\n\r\n");
        let (status, body) = ask(&mut mmds, &forwarded);
        assert_eq!(status, "HTTP/1.1 400 Bad Request");
        assert_eq!(body, "Unsupported header name. Key: X-Forwarded-For");
        let (status, _) = ask(&mut mmds, "PUT /latest/other HTTP/1.1\r\n\r\n");
        assert_eq!(status, "HTTP/1.1 404 Not Found");
    }

    #[test]
    fn other_methods_get_405_with_allow() {
        let mut mmds = store(MmdsVersion::V1);
        let Parsed::Answered { response, .. } = serve(&mut mmds, b"POST / HTTP/1.1\r\n\r\n") else {
            panic!()
        };
        let text = String::from_utf8(response).unwrap();
        assert!(
            text.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
            "{text}"
        );
        assert!(text.contains("\r\nAllow: GET, PUT\r\n"), "{text}");
    }

    #[test]
    fn partial_huge_and_malformed_requests() {
        let mut mmds = store(MmdsVersion::V1);
        assert_eq!(
            serve(&mut mmds, b"GET /latest HTTP/1.1\r\nHost: x"),
            Parsed::Incomplete
        );
        let huge = format!("GET /{} HTTP/1.1\r\n", "a".repeat(MAX_REQUEST_BYTES));
        assert!(matches!(
            serve(&mut mmds, huge.as_bytes()),
            Parsed::Answered { close: true, .. }
        ));
        let garbage = serve(&mut mmds, b"\x00\x01\x02 nonsense\r\n\r\n");
        assert!(matches!(garbage, Parsed::Answered { close: true, .. }));
        let body = b"PUT /latest/api/token HTTP/1.1\r\nContent-Length: 100000\r\n\r\n";
        assert!(matches!(
            serve(&mut mmds, body),
            Parsed::Answered { close: true, .. }
        ));
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut mmds = store(MmdsVersion::V2);
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..2000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let len = usize::try_from(seed % 300).unwrap();
            let mut bytes = b"GET /latest HTTP/1.1\r\n".to_vec();
            bytes.extend((0..len).map(|i| {
                seed.rotate_left(u32::try_from(i % 64).unwrap())
                    .to_le_bytes()[0]
            }));
            let _ = serve(&mut mmds, &bytes);
        }
    }

    #[test]
    fn pipelined_requests_are_consumed_one_at_a_time() {
        let mut mmds = store(MmdsVersion::V1);
        let one = "GET /latest HTTP/1.1\r\n\r\n";
        let two = format!("{one}{one}");
        let Parsed::Answered {
            consumed, close, ..
        } = serve(&mut mmds, two.as_bytes())
        else {
            panic!()
        };
        assert_eq!((consumed, close), (one.len(), false));
    }
}
