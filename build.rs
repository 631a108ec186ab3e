//! Compiles the seccomp policy of the build target (`resources/seccomp/<arch>.json`, in
//! seccompiler's JSON format) into BPF and writes it to `$OUT_DIR/seccomp_filters.bin` in the
//! format `src/seccomp.rs` reads, so that the binary embeds ready-to-install programs. The other
//! architectures' policies are compiled too (and thrown away), so that each build checks them.
//!
//! It also checks a rule the policy must keep: threads inherit the filter of the thread that
//! creates them, and vCPU threads and the teardown child are created by the VMM thread after it
//! may have installed its own filter, so every call the `vcpu` and `teardown` policies allow
//! must be allowed by the `vmm` policy too, or those threads would be killed by the VMM's.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;

fn main() {
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").expect("CARGO_CFG_TARGET_ARCH");
    let out_dir = std::env::var("OUT_DIR").expect("OUT_DIR");
    let policy = format!("resources/seccomp/{arch}.json");
    println!("cargo::rerun-if-changed=resources/seccomp");
    println!("cargo::rerun-if-changed=build.rs");
    let out = Path::new(&out_dir).join("seccomp_filters.bin");

    // Every policy in the tree compiles, not only the target's: a mistake in another
    // architecture's file shows in every build.
    for other in ["x86_64", "aarch64"] {
        if other != arch {
            let path = format!("resources/seccomp/{other}.json");
            let text = std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"));
            compile(&path, other, &text);
        }
    }
    let bytes = match std::fs::read(&policy) {
        // No policy for this target: an empty map; flick then refuses to start with filters
        // and says so (only `--no-seccomp` or `--seccomp-filter` work there).
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0u64.to_le_bytes().to_vec(),
        Err(e) => panic!("cannot read {policy}: {e}"),
        Ok(text) => compile(&policy, &arch, &text),
    };
    std::fs::write(&out, bytes).unwrap_or_else(|e| panic!("cannot write {}: {e}", out.display()));
}

fn compile(policy: &str, arch: &str, text: &[u8]) -> Vec<u8> {
    let json: Value =
        serde_json::from_slice(text).unwrap_or_else(|e| panic!("{policy} is not JSON: {e}"));
    check_inheritance(policy, &json);
    let target = seccompiler::TargetArch::try_from(arch)
        .unwrap_or_else(|e| panic!("seccompiler has no target {arch}: {e:?}"));
    let programs = seccompiler::compile_from_json(text, target)
        .unwrap_or_else(|e| panic!("cannot compile {policy}: {e}"));
    // Sorted, so the same policy always gives the same bytes.
    let programs: BTreeMap<_, _> = programs.into_iter().collect();
    let mut out = Vec::new();
    out.extend_from_slice(&(programs.len() as u64).to_le_bytes());
    for (name, program) in programs {
        assert!(
            program.len() <= 4096,
            "{policy}: the {name} program has {} instructions, more than the kernel accepts",
            program.len()
        );
        out.extend_from_slice(&(name.len() as u64).to_le_bytes());
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&(program.len() as u64).to_le_bytes());
        for instruction in program {
            out.extend_from_slice(&instruction.code.to_le_bytes());
            out.push(instruction.jt);
            out.push(instruction.jf);
            out.extend_from_slice(&instruction.k.to_le_bytes());
        }
    }
    out
}

/// A policy's rules: syscall → argument conditions of each rule (empty: any arguments).
fn rules(policy: &str, json: &Value, role: &str) -> BTreeMap<String, Vec<Vec<Value>>> {
    let filter = json
        .get(role)
        .and_then(|f| f.get("filter"))
        .and_then(Value::as_array)
        .unwrap_or_else(|| panic!("{policy}: no {role} filter"));
    let mut map: BTreeMap<String, Vec<Vec<Value>>> = BTreeMap::new();
    for rule in filter {
        let name = rule["syscall"]
            .as_str()
            .unwrap_or_else(|| panic!("{policy}: a {role} rule has no syscall"))
            .to_string();
        let args: Vec<Value> = rule
            .get("args")
            .and_then(Value::as_array)
            .map(|args| {
                args.iter()
                    .map(|a| {
                        let mut a = a.clone();
                        if let Some(o) = a.as_object_mut() {
                            o.remove("comment");
                        }
                        a
                    })
                    .collect()
            })
            .unwrap_or_default();
        let entry = map.entry(name.clone()).or_default();
        // seccompiler drops an unconditional rule next to conditional ones for the same call,
        // which would silently narrow the policy.
        assert!(
            entry.is_empty() || (!args.is_empty() && entry.iter().all(|r| !r.is_empty())),
            "{policy}: {role} mixes unconditional and conditional rules for {name}"
        );
        entry.push(args);
    }
    map
}

fn check_inheritance(policy: &str, json: &Value) {
    let vmm = rules(policy, json, "vmm");
    for role in ["vcpu", "teardown"] {
        for (name, conditions) in rules(policy, json, role) {
            let allowed = vmm.get(&name).unwrap_or_else(|| {
                panic!("{policy}: {role} allows {name}, which the vmm filter it inherits forbids")
            });
            let unconditional = allowed.iter().any(Vec::is_empty);
            for rule in conditions {
                assert!(
                    unconditional || allowed.contains(&rule),
                    "{policy}: {role} allows {name} with {rule:?}, which the vmm filter forbids"
                );
            }
        }
    }
}
