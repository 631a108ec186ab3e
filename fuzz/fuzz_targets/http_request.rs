//! HTTP request framing (`api::http::RequestReader`) on a connection whose bytes come from the
//! input, split into reads at input-chosen points, then routing of every request read.
//!
//! Input: byte 0 picks the payload limit, byte 1 the read size; the rest is the stream.
#![no_main]

use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use flick::api::http::{RequestReader, Stream};
use flick::api::routes::route;
use libfuzzer_sys::fuzz_target;

struct Conn<'a> {
    input: &'a [u8],
    chunk: usize,
    written: usize,
}

impl Read for Conn<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.input.len().min(buf.len()).min(self.chunk);
        buf[..n].copy_from_slice(&self.input[..n]);
        self.input = &self.input[n..];
        Ok(n)
    }
}

impl Write for Conn<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.written += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Stream for Conn<'_> {
    fn set_read_deadline(&mut self, _: Option<Instant>) -> io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let [limit, chunk, stream @ ..] = data else {
        return;
    };
    // Payload limits from 0 to 64 KiB; reads of 1 to 256 bytes (0 means "as much as asked").
    let max_payload = usize::from(*limit) * 256;
    let chunk = if *chunk == 0 {
        usize::MAX
    } else {
        usize::from(*chunk)
    };
    let mut conn = Conn {
        input: stream,
        chunk,
        written: 0,
    };
    let mut reader = RequestReader::new(max_payload, Duration::from_secs(5));
    // Each request consumes at least one byte, so this ends.
    loop {
        match reader.read_request(&mut conn) {
            Ok(Some(request)) => {
                assert!(request.body.len() <= max_payload);
                assert!(request.path.len() <= stream.len());
                let _ = route(&request.method, &request.path, &request.body);
                if !request.keep_alive {
                    break;
                }
            }
            Ok(None) => break,
            Err(e) => {
                if let Some(response) = e.response() {
                    let bytes = response.encode(false);
                    assert!(bytes.starts_with(b"HTTP/1.1 4"));
                }
                break;
            }
        }
    }
});
