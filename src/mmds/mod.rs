//! MMDS, the microVM metadata service: a JSON document the host sets through the API and the
//! guest reads over HTTP at a link-local address on the interfaces MMDS is enabled on.
//!
//! This module owns the data store ([`Mmds`]: the document, its size limit, the version and
//! output options, the V2 session tokens), the guest-facing HTTP semantics ([`http`]) and the
//! small TCP/IP responder that a network device hands the guest's MMDS frames to ([`stack`],
//! built on smoltcp). The store is shared (`Arc<Mutex<_>>`) between the VMM thread's action
//! handling and the network devices, which also run on the VMM thread. Imports `config` only.

pub mod http;
pub mod stack;
mod token;

use std::sync::{Arc, Mutex};

use serde_json::Value;

use crate::config::MmdsVersion;
pub use token::{TokenError, MAX_TOKEN_TTL_SECONDS, MIN_TOKEN_TTL_SECONDS};

/// Default size limit of the document, in bytes of compact JSON (Firecracker's default API
/// payload limit, which its MMDS limit defaults to).
pub const DEFAULT_SIZE_LIMIT: usize = 51_200;

/// A data store shared between the VMM and the network devices that answer for it.
pub type SharedMmds = Arc<Mutex<Mmds>>;

/// Why a store operation failed; messages are Firecracker's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MmdsError {
    #[error("The MMDS patch request doesn't fit.")]
    TooLarge,
    #[error("The MMDS data store is not initialized.")]
    NotInitialized,
    #[error("The MMDS resource does not exist.")]
    NotFound,
    #[error("Cannot retrieve value. The value has an unsupported type.")]
    UnsupportedValueType,
}

/// How a value is rendered for the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    Json,
    /// EC2 IMDS style: an object's keys one per line (objects with a trailing `/`), a string as
    /// itself.
    Imds,
}

/// The metadata document and the settings of the service.
#[derive(Debug)]
pub struct Mmds {
    data: Value,
    initialized: bool,
    size_limit: usize,
    version: MmdsVersion,
    imds_compat: bool,
    tokens: token::Tokens,
}

impl Default for Mmds {
    fn default() -> Self {
        Mmds::new(DEFAULT_SIZE_LIMIT)
    }
}

/// Shares `mmds` for the devices.
pub fn shared(mmds: Mmds) -> SharedMmds {
    Arc::new(Mutex::new(mmds))
}

/// Locks a store, recovering it from a panicked holder (its data stays consistent: every
/// change is a single assignment).
pub fn lock(mmds: &SharedMmds) -> std::sync::MutexGuard<'_, Mmds> {
    mmds.lock().unwrap_or_else(|p| p.into_inner())
}

fn encoded_len(value: &Value) -> usize {
    serde_json::to_vec(value).map_or(usize::MAX, |v| v.len())
}

impl Mmds {
    /// An empty store whose document may take up to `size_limit` bytes.
    pub fn new(size_limit: usize) -> Self {
        Mmds {
            data: Value::Null,
            initialized: false,
            size_limit,
            version: MmdsVersion::V1,
            imds_compat: false,
            tokens: token::Tokens::default(),
        }
    }

    pub fn size_limit(&self) -> usize {
        self.size_limit
    }

    pub fn set_size_limit(&mut self, bytes: usize) {
        self.size_limit = bytes;
    }

    pub fn version(&self) -> MmdsVersion {
        self.version
    }

    pub fn imds_compat(&self) -> bool {
        self.imds_compat
    }

    /// Sets the version and output option (`PUT /mmds/config`, or a restored snapshot).
    pub fn configure(&mut self, version: MmdsVersion, imds_compat: bool) {
        self.version = version;
        self.imds_compat = imds_compat;
    }

    /// Replaces the document.
    pub fn put(&mut self, data: Value) -> Result<(), MmdsError> {
        if encoded_len(&data) > self.size_limit {
            return Err(MmdsError::TooLarge);
        }
        self.data = data;
        self.initialized = true;
        Ok(())
    }

    /// Applies a JSON merge patch (RFC 7396) to the document; nothing changes if the result
    /// would exceed the limit.
    pub fn patch(&mut self, patch: &Value) -> Result<(), MmdsError> {
        if !self.initialized {
            return Err(MmdsError::NotInitialized);
        }
        let mut data = self.data.clone();
        merge_patch(&mut data, patch);
        if encoded_len(&data) > self.size_limit {
            return Err(MmdsError::TooLarge);
        }
        self.data = data;
        Ok(())
    }

    /// The document as the API returns it (`{}` before anything was put).
    pub fn document(&self) -> String {
        match &self.data {
            Value::Null => "{}".to_string(),
            data => data.to_string(),
        }
    }

    /// The value at `path` (slash-separated keys, `/` for the whole document), rendered in
    /// `format` (always IMDS with `imds_compat`).
    pub fn get(&self, path: &str, format: OutputFormat) -> Result<String, MmdsError> {
        let pointer = path.strip_suffix('/').unwrap_or(path);
        let value = self.data.pointer(pointer).ok_or(MmdsError::NotFound)?;
        let format = if self.imds_compat {
            OutputFormat::Imds
        } else {
            format
        };
        match format {
            OutputFormat::Json => Ok(value.to_string()),
            OutputFormat::Imds => imds_text(value),
        }
    }

    /// Issues a V2 session token valid for `ttl_seconds`.
    pub fn issue_token(&mut self, ttl_seconds: u32) -> Result<String, TokenError> {
        self.tokens.issue(ttl_seconds)
    }

    /// Whether `token` was issued here and has not expired.
    pub fn token_is_valid(&self, token: &str) -> bool {
        self.tokens.is_valid(token)
    }
}

fn imds_text(value: &Value) -> Result<String, MmdsError> {
    match value {
        Value::Object(map) => {
            let keys: Vec<String> = map
                .iter()
                .map(|(k, v)| {
                    if v.is_object() {
                        format!("{k}/")
                    } else {
                        k.clone()
                    }
                })
                .collect();
            Ok(keys.join("\n"))
        }
        Value::String(text) => Ok(text.clone()),
        _ => Err(MmdsError::UnsupportedValueType),
    }
}

/// RFC 7396: objects merge key by key, `null` removes a key, anything else replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(changes) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(serde_json::Map::new());
    }
    if let Value::Object(doc) = target {
        for (key, change) in changes {
            if change.is_null() {
                doc.remove(key);
            } else {
                merge_patch(doc.entry(key.clone()).or_insert(Value::Null), change);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn store() -> Mmds {
        let mut mmds = Mmds::default();
        mmds.put(json!({"latest": {"meta-data": {"ami-id": "ami-1", "n": 3,
                                                 "net": {"mac": "x"}}}}))
            .unwrap();
        mmds
    }

    #[test]
    fn merge_patch_follows_rfc_7396() {
        let mut doc = json!({"a": "b", "c": {"d": "e", "f": "g"}});
        merge_patch(&mut doc, &json!({"a": "z", "c": {"f": null}}));
        assert_eq!(doc, json!({"a": "z", "c": {"d": "e"}}));
        merge_patch(&mut doc, &json!(["list"]));
        assert_eq!(doc, json!(["list"]));
        merge_patch(&mut doc, &json!({"k": {"deep": null, "x": 1}}));
        assert_eq!(doc, json!({"k": {"x": 1}}));
    }

    #[test]
    fn patch_before_put_is_refused() {
        let mut mmds = Mmds::default();
        assert_eq!(mmds.patch(&json!({"a": 1})), Err(MmdsError::NotInitialized));
        assert_eq!(mmds.document(), "{}");
    }

    #[test]
    fn documents_over_the_limit_are_refused_and_leave_the_store_unchanged() {
        let mut mmds = Mmds::new(20);
        mmds.put(json!({"a": "b"})).unwrap();
        let big = json!({"a": "0123456789012345678901234567890"});
        assert_eq!(mmds.put(big.clone()), Err(MmdsError::TooLarge));
        assert_eq!(mmds.patch(&big), Err(MmdsError::TooLarge));
        assert_eq!(mmds.document(), r#"{"a":"b"}"#);
    }

    #[test]
    fn imds_format_lists_keys_and_marks_objects() {
        let mmds = store();
        let text = mmds.get("/latest/meta-data/", OutputFormat::Imds).unwrap();
        assert_eq!(text, "ami-id\nn\nnet/");
        let leaf = mmds.get("/latest/meta-data/ami-id", OutputFormat::Imds);
        assert_eq!(leaf.unwrap(), "ami-1");
        let number = mmds.get("/latest/meta-data/n", OutputFormat::Imds);
        assert_eq!(number, Err(MmdsError::UnsupportedValueType));
    }

    #[test]
    fn json_format_returns_the_value_and_imds_compat_overrides_it() {
        let mut mmds = store();
        let value = mmds.get("/latest/meta-data/ami-id", OutputFormat::Json);
        assert_eq!(value.unwrap(), r#""ami-1""#);
        assert_eq!(
            mmds.get("/latest/nope", OutputFormat::Json),
            Err(MmdsError::NotFound)
        );
        mmds.configure(MmdsVersion::V2, true);
        let compat = mmds.get("/latest/meta-data/ami-id", OutputFormat::Json);
        assert_eq!(compat.unwrap(), "ami-1");
    }
}
