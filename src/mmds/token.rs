//! MMDS V2 session tokens: random 32-byte values (hex) with an expiry, kept in a bounded list.
//! A guest that asks for more than [`MAX_LIVE_TOKENS`] tokens makes the oldest ones invalid
//! instead of growing the list. Tokens are never saved: a restored VM needs new ones.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Shortest token lifetime a guest may ask for.
pub const MIN_TOKEN_TTL_SECONDS: u32 = 1;
/// Longest token lifetime a guest may ask for (6 hours).
pub const MAX_TOKEN_TTL_SECONDS: u32 = 21_600;
/// Most tokens valid at once.
pub const MAX_LIVE_TOKENS: usize = 1024;
const TOKEN_BYTES: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error(
        "Invalid time to live value provided for token: {0}. Please provide a value between \
         {MIN_TOKEN_TTL_SECONDS} and {MAX_TOKEN_TTL_SECONDS}."
    )]
    InvalidTtl(u32),
    #[error("Failed to generate a token.")]
    Random,
}

#[derive(Debug, Default)]
pub struct Tokens {
    live: VecDeque<(String, Instant)>,
}

fn random_hex() -> Option<String> {
    let mut bytes = [0u8; TOKEN_BYTES];
    let mut filled = 0;
    while filled < bytes.len() {
        let rest = &mut bytes[filled..];
        // SAFETY: getrandom writes at most `rest.len()` bytes into the buffer, which we own.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        let n = usize::try_from(n).ok().filter(|&n| n > 0)?;
        filled += n;
    }
    Some(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Compares without stopping at the first difference.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

impl Tokens {
    pub fn issue(&mut self, ttl_seconds: u32) -> Result<String, TokenError> {
        if !(MIN_TOKEN_TTL_SECONDS..=MAX_TOKEN_TTL_SECONDS).contains(&ttl_seconds) {
            return Err(TokenError::InvalidTtl(ttl_seconds));
        }
        let now = Instant::now();
        self.live.retain(|(_, expiry)| *expiry > now);
        while self.live.len() >= MAX_LIVE_TOKENS {
            self.live.pop_front();
        }
        let token = random_hex().ok_or(TokenError::Random)?;
        let expiry = now + Duration::from_secs(u64::from(ttl_seconds));
        self.live.push_back((token.clone(), expiry));
        Ok(token)
    }

    pub fn is_valid(&self, token: &str) -> bool {
        let now = Instant::now();
        self.live
            .iter()
            .any(|(t, expiry)| *expiry > now && same(t, token))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issued_tokens_are_valid_and_others_are_not() {
        let mut tokens = Tokens::default();
        let a = tokens.issue(60).unwrap();
        let b = tokens.issue(60).unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), 2 * TOKEN_BYTES);
        assert!(tokens.is_valid(&a) && tokens.is_valid(&b));
        assert!(!tokens.is_valid("deadbeef"));
        assert!(!tokens.is_valid(""));
    }

    #[test]
    fn ttl_outside_1_to_21600_is_refused() {
        let mut tokens = Tokens::default();
        assert_eq!(tokens.issue(0), Err(TokenError::InvalidTtl(0)));
        assert_eq!(tokens.issue(21_601), Err(TokenError::InvalidTtl(21_601)));
        assert!(tokens.issue(21_600).is_ok());
    }

    #[test]
    fn the_oldest_token_goes_when_the_list_is_full() {
        let mut tokens = Tokens::default();
        let first = tokens.issue(60).unwrap();
        for _ in 0..MAX_LIVE_TOKENS {
            tokens.issue(60).unwrap();
        }
        assert!(!tokens.is_valid(&first));
        assert_eq!(tokens.live.len(), MAX_LIVE_TOKENS);
    }
}
