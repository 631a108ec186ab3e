//! flick: a lightweight KVM virtual machine monitor with a Firecracker-compatible API.
//!
//! Layering (each module may import only those listed before it):
//! `config` → `control` → `logger` → `metrics`, `hex`, `mmds`, `memory` → `devices` → `arch` → `kvm`
//! → `snapshot` → `vmm`. `api` stands beside them and imports only `config`, `control` and `metrics`; only
//! `main` uses it. `scripts/check-layering.sh` enforces the rules the test suite relies on.
//! Threads: the VMM thread (event loop in `vmm`), one thread per vCPU (`kvm::vcpu`), and the API
//! threads (`api`: the `flick_api` acceptor and one thread per open connection).

pub mod api;
pub mod arch;
pub mod config;
pub mod control;
pub mod devices;
pub mod hex;
pub mod kvm;
pub mod logger;
pub mod memory;
pub mod metrics;
pub mod mmds;
pub mod seccomp;
pub mod snapshot;
pub mod vmm;

/// Renders an error and its sources as one line: `outer: inner: innermost`.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(inner) = source {
        let msg = inner.to_string();
        if !text.contains(&msg) {
            text.push_str(": ");
            text.push_str(&msg);
        }
        source = inner.source();
    }
    text.replace('\n', " ")
}
