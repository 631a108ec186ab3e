//! The config file parser (`config::VmConfig::from_json`) and each body's `validate`, on
//! arbitrary text; then what the VMM does with an accepted file before opening anything: the
//! MAC and TAP name checks, and `GET /vm/config`'s rendering, which must parse back to the same
//! configuration.
#![no_main]

use flick::config::{parse_mac, VmConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = VmConfig::from_json(text) else {
        return;
    };
    let _ = config.machine_config.validate();
    if let Some(boot) = &config.boot_source {
        let _ = boot.validate();
    }
    for drive in &config.drives {
        let _ = drive.validate();
    }
    for net in &config.network_interfaces {
        if net.validate().is_ok() {
            if let Some(mac) = &net.guest_mac {
                let bytes = parse_mac(mac).expect("validated MAC parses");
                // An accepted MAC is six two-digit hex octets: writing it back gives the same
                // address (ignoring case).
                let written = bytes.map(|b| format!("{b:02x}")).join(":");
                assert_eq!(written, mac.to_ascii_lowercase(), "MAC {mac:?}");
            }
        }
    }
    let rendered = serde_json::to_string(&config).expect("a parsed config renders");
    let again = VmConfig::from_json(&rendered).expect("a rendered config parses");
    assert_eq!(again, config);
});
