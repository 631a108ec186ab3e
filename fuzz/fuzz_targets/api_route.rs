//! The API router (`api::routes::route`) on an arbitrary method, path and body, as the HTTP
//! layer hands them over, and the answer each refusal gives.
//!
//! Input: byte 0 picks the method (a real one, or text from the input); then the path up to the
//! first newline; the rest is the body.
#![no_main]

use flick::api::http::{Response, Status};
use flick::api::routes::{route, Endpoint};
use libfuzzer_sys::fuzz_target;

const METHODS: [&str; 6] = ["GET", "PUT", "PATCH", "POST", "DELETE", "HEAD"];

fuzz_target!(|data: &[u8]| {
    let [selector, rest @ ..] = data else {
        return;
    };
    let (method, rest) = match METHODS.get(usize::from(*selector)) {
        Some(m) => (*m, rest),
        None => {
            // A method from the input, up to the first space.
            let end = rest.iter().position(|&b| b == b' ').unwrap_or(rest.len());
            let Ok(m) = std::str::from_utf8(&rest[..end]) else {
                return;
            };
            (m, rest.get(end + 1..).unwrap_or_default())
        }
    };
    let end = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
    let Ok(path) = std::str::from_utf8(&rest[..end]) else {
        return;
    };
    let body = rest.get(end + 1..).unwrap_or_default();
    let _ = Endpoint::of(path).as_str();
    if let Err(e) = route(method, path, body) {
        let response = Response::fault(Status::BadRequest, &e.to_string());
        let _ = response.encode(true);
    }
});
