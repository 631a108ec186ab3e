//! flick-bench: compares launching a flick microVM with QEMU microvm, OCI containers (crun,
//! runc, podman), namespaces (unshare) and a plain fork+exec on the same host, and starts many
//! microVMs at once (`launch-many`). `scripts/bench.sh` installs the tools, builds everything
//! and runs `flick-bench compare`; `scripts/launch-many.sh` runs `flick-bench launch-many`.

mod compare;
mod host;
mod launch_many;
mod measure;
mod plot;
mod report;

use std::path::PathBuf;
use std::time::Duration;

use serde_json::json;

const USAGE: &str = "\
Usage:
  flick-bench [compare] [--runs N] [--linux-runs N] [--warmup N] [--vmm NAME=PATH]...
                        [--only a,b,...] [--with-linux] [--no-smaps] [--settle S] [--verbose]
                        [--out DIR] [--repo DIR]
                        [--flick PATH] [--guest-dir DIR] [--busybox PATH]
  flick-bench launch-many N [--mem-mib M] [--api] [--restore] [--flick PATH] [--guest PATH]
                        [--dir DIR] [--keep] [--json FILE] [--timeout-s S]
  flick-bench variants        list the variant names

compare (defaults): 20 runs per variant (3 for the Linux ones), 2 warm-up runs, repo = current
directory, flick = REPO/target/release/flick, guest dir = REPO/target/test-guest,
out = REPO/target/bench/<UTC timestamp>/ with results.json, results.md and launch.png.
The Linux variants (flick-linux, flick-linux-echo: `busybox echo hi` in guest user space
after a cold boot, flick-linux-restore-echo: the same after restoring a snapshot of a guest
waiting for the command) run only with --with-linux or when --only names them. --no-smaps turns off the
memory sampling of VMM runs (to see what the sampler itself costs). Before each variant
the harness waits until the host is at least 85% idle over 0.5 s, for at most --settle S
seconds (default 20); the idle share it started with is recorded.
Each --vmm NAME=PATH (a Firecracker-compatible VMM, e.g. firecracker) adds three variants run
like flick's: NAME (boots the test guest, like flick-testguest), NAME-api-ready (like
flick-api-ready) and NAME-restore (like flick-restore, from a snapshot NAME itself took).
";

fn die(msg: &str) -> ! {
    eprintln!("flick-bench: {msg}");
    eprint!("{USAGE}");
    std::process::exit(2);
}

fn value(args: &mut std::vec::IntoIter<String>, flag: &str) -> String {
    args.next()
        .unwrap_or_else(|| die(&format!("{flag} needs a value")))
}

fn number(args: &mut std::vec::IntoIter<String>, flag: &str) -> usize {
    let v = value(args, flag);
    v.parse()
        .unwrap_or_else(|_| die(&format!("{flag}: not a number: {v}")))
}

fn main() {
    let mut argv: Vec<String> = std::env::args().skip(1).collect();
    let sub = match argv.first().map(String::as_str) {
        Some("launch-many") | Some("compare") | Some("variants") => argv.remove(0),
        Some("-h") | Some("--help") => {
            print!("{USAGE}");
            return;
        }
        _ => "compare".into(),
    };
    measure::install_signal_handlers();
    match sub.as_str() {
        "launch-many" => std::process::exit(launch_many_main(argv)),
        "variants" => {
            for v in compare::known_variants(&[]) {
                println!("{v}");
            }
        }
        _ => std::process::exit(compare_main(argv)),
    }
}

fn compare_main(argv: Vec<String>) -> i32 {
    let mut args = argv.into_iter();
    let mut runs = 20;
    let mut linux_runs = 3;
    let mut warmup = 2;
    let mut vmms = Vec::new();
    let mut only = None;
    let mut with_linux = false;
    let mut smaps = true;
    let mut verbose = false;
    let mut settle = 20u64;
    let mut out = None;
    let mut repo = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    let (mut flick, mut guest_dir, mut busybox) = (None, None, "/bin/busybox".to_string());
    while let Some(a) = args.next() {
        match a.as_str() {
            "--runs" => runs = number(&mut args, &a),
            "--linux-runs" => linux_runs = number(&mut args, &a),
            "--warmup" => warmup = number(&mut args, &a),
            "--vmm" => {
                let v = value(&mut args, &a);
                let (n, p) = v
                    .split_once('=')
                    .unwrap_or_else(|| die("--vmm takes NAME=PATH"));
                // NAME, NAME-api-ready and NAME-restore must all be new names.
                let builtin = compare::known_variants(&[]);
                let clash = [
                    n.to_string(),
                    format!("{n}-api-ready"),
                    format!("{n}-restore"),
                ]
                .iter()
                .any(|m| builtin.contains(m));
                if n.is_empty() || clash {
                    die(&format!(
                        "--vmm: {n:?} is empty or it or its -api-ready/-restore variant is a built-in variant's name"
                    ));
                }
                vmms.push((n.to_string(), p.to_string()));
            }
            "--only" => {
                only = Some(
                    value(&mut args, &a)
                        .split(',')
                        .map(|s| s.trim().to_string())
                        .filter(|s| !s.is_empty())
                        .collect::<Vec<_>>(),
                )
            }
            "--with-linux" => with_linux = true,
            "--no-smaps" => smaps = false,
            "--verbose" => verbose = true,
            "--settle" => settle = number(&mut args, &a) as u64,
            "--out" => out = Some(PathBuf::from(value(&mut args, &a))),
            "--repo" => repo = PathBuf::from(value(&mut args, &a)),
            "--flick" => flick = Some(value(&mut args, &a)),
            "--guest-dir" => guest_dir = Some(PathBuf::from(value(&mut args, &a))),
            "--busybox" => busybox = value(&mut args, &a),
            "-h" | "--help" => {
                print!("{USAGE}");
                return 0;
            }
            _ => die(&format!("unknown argument {a}")),
        }
    }
    if runs == 0 || linux_runs == 0 {
        die("--runs and --linux-runs must be at least 1");
    }
    let known = compare::known_variants(&vmms);
    if let Some(o) = &only {
        for v in o {
            if !known.contains(v) {
                die(&format!(
                    "--only: unknown variant {v} (known: {})",
                    known.join(", ")
                ));
            }
        }
    }
    let flick = flick.unwrap_or_else(|| repo.join("target/release/flick").display().to_string());
    let guest_dir = guest_dir.unwrap_or_else(|| repo.join("target/test-guest"));
    let (started, stamp) = host::now_utc();
    let out = out.unwrap_or_else(|| repo.join("target/bench").join(&stamp));
    if let Err(e) = std::fs::create_dir_all(&out) {
        die(&format!("cannot create {}: {e}", out.display()));
    }
    let opts = compare::Opts {
        runs,
        linux_runs,
        warmup,
        vmms,
        only,
        with_linux,
        repo,
        flick: flick.clone(),
        guest_dir,
        busybox,
        smaps,
        verbose,
        settle: Duration::from_secs(settle),
    };
    let mut hostinfo = host::info(&flick, &opts.repo);
    hostinfo["load_before"] = json!(host::loadavg());
    eprintln!(
        "flick-bench: {} ({}), load {}, results in {}",
        hostinfo["kvm"].as_str().unwrap_or(""),
        hostinfo["cpu_model"].as_str().unwrap_or(""),
        host::loadavg(),
        out.display()
    );
    let results = compare::run_all(&opts);
    hostinfo["load_after"] = json!(host::loadavg());

    let subtitle = format!(
        "{} runs per variant · {} · {} cores · KVM: {} · load {} → {} · {}",
        runs,
        hostinfo["cpu_model"].as_str().unwrap_or(""),
        hostinfo["cores"],
        hostinfo["kvm"]
            .as_str()
            .unwrap_or("")
            .split(" (")
            .next()
            .unwrap_or(""),
        hostinfo["load_before"]
            .as_str()
            .unwrap_or("")
            .split_whitespace()
            .next()
            .unwrap_or(""),
        hostinfo["load_after"]
            .as_str()
            .unwrap_or("")
            .split_whitespace()
            .next()
            .unwrap_or(""),
        started
    );
    let png = out.join("launch.png");
    let chart_error = plot::launch_chart(&png, &results, &subtitle).err();
    if let Some(e) = &chart_error {
        eprintln!("flick-bench: no chart: {e}");
    }
    let doc = json!({
        "started": started,
        "runs_per_variant": runs,
        "linux_runs": linux_runs,
        "warmup_runs": warmup,
        "host": hostinfo,
        "variants": results.iter().map(report::variant_json).collect::<Vec<_>>(),
        "chart": if chart_error.is_none() { json!("launch.png") } else { json!(null) },
        "chart_error": chart_error,
    });
    let md = report::markdown(&hostinfo, &results, runs, &started);
    let w = std::fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(&doc).unwrap(),
    )
    .and_then(|_| std::fs::write(out.join("results.md"), &md));
    if let Err(e) = w {
        eprintln!("flick-bench: cannot write results: {e}");
        return 1;
    }
    println!("{}", report::markdown_table(&results));
    println!(
        "results: {}/results.md, results.json, launch.png",
        out.display()
    );
    if measure::interrupted() {
        130
    } else {
        0
    }
}

fn launch_many_main(argv: Vec<String>) -> i32 {
    let mut args = argv.into_iter();
    let mut n = None;
    let mut o = launch_many::Opts {
        n: 0,
        mem_mib: 32,
        api: false,
        flick: "target/release/flick".into(),
        guest: PathBuf::from("target/test-guest/testguest.elf"),
        dir: None,
        keep: false,
        json: None,
        timeout: Duration::from_secs(0),
        restore: false,
    };
    let mut timeout = None;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--mem-mib" => o.mem_mib = number(&mut args, &a) as u64,
            "--api" => o.api = true,
            "--flick" => o.flick = value(&mut args, &a),
            "--guest" => o.guest = PathBuf::from(value(&mut args, &a)),
            "--dir" => o.dir = Some(PathBuf::from(value(&mut args, &a))),
            "--keep" => o.keep = true,
            "--restore" => o.restore = true,
            "--json" => o.json = Some(PathBuf::from(value(&mut args, &a))),
            "--timeout-s" => timeout = Some(number(&mut args, &a) as u64),
            "-h" | "--help" => {
                print!("{USAGE}");
                return 0;
            }
            v if n.is_none() && v.parse::<usize>().is_ok() => n = v.parse().ok(),
            _ => die(&format!("unknown argument {a}")),
        }
    }
    o.n = n.unwrap_or_else(|| die("launch-many needs N"));
    o.timeout = Duration::from_secs(timeout.unwrap_or(60 + o.n as u64 / 10));
    launch_many::run(&o)
}
