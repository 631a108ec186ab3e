//! Summaries: results.json and results.md.

use serde_json::{json, Value};

use crate::compare::VariantResult;

/// min / median / p90 / max, nearest-rank: the one percentile definition of flick's benchmarks.
pub use flick_fixtures::stats::{stats, Stats};

fn stats_json(s: Option<Stats>) -> Value {
    match s {
        Some(s) => json!({"min": s.min, "median": s.median, "p90": s.p90, "max": s.max, "n": s.n}),
        None => Value::Null,
    }
}

pub struct Summary {
    pub first: Option<Stats>,
    pub end: Option<Stats>,
    pub boot: Option<Stats>,
    pub cpu: Option<Stats>,
    pub rss_mib: Option<Stats>,
    pub overhead_mib: Option<Stats>,
    pub samples: Option<Stats>,
    pub runs_without_sample: usize,
    pub sampled: bool,
}

pub fn summarize(r: &VariantResult) -> Summary {
    let col = |f: &dyn Fn(&crate::measure::Outcome) -> Option<f64>| {
        stats(r.runs.iter().filter_map(f).collect())
    };
    Summary {
        first: col(&|o| o.first_output_ms),
        end: col(&|o| o.end_ms),
        boot: col(&|o| o.boot_timer_ms),
        cpu: col(&|o| Some(o.cpu_ms)),
        rss_mib: col(&|o| Some(o.maxrss_kib as f64 / 1024.0)),
        overhead_mib: if r.is_vmm {
            col(&|o| o.overhead_kib.map(|k| k as f64 / 1024.0))
        } else {
            None
        },
        samples: if r.is_vmm {
            col(&|o| Some(o.samples as f64))
        } else {
            None
        },
        runs_without_sample: if r.is_vmm {
            r.runs
                .iter()
                .filter(|o| o.sampled && o.samples == 0)
                .count()
        } else {
            0
        },
        sampled: r.runs.iter().any(|o| o.sampled),
    }
}

pub fn variant_json(r: &VariantResult) -> Value {
    let s = summarize(r);
    let raw: Vec<Value> = r
        .runs
        .iter()
        .map(|o| {
            json!({
                "first_output_ms": o.first_output_ms,
                "end_ms": o.end_ms,
                "exit_ms": o.exit_ms,
                "status": o.status,
                "cpu_ms": o.cpu_ms,
                "peak_rss_kib": o.maxrss_kib,
                "boot_timer_ms": o.boot_timer_ms,
                "overhead_rss_kib": o.overhead_kib,
                "total_rss_kib": o.rss_kib,
                "smaps_samples": o.samples,
            })
        })
        .collect();
    json!({
        "name": r.name,
        "description": r.description,
        "command": r.command,
        "end_event": r.end_label,
        "status": if r.skipped.is_some() { "skipped" } else { "measured" },
        "skipped_reason": r.skipped,
        "notes": r.notes,
        "load_before": r.load_before,
        "load_after": r.load_after,
        "host_idle_pct_before": if r.idle_before.is_finite() { json!(r.idle_before) } else { Value::Null },
        "runs_ok": r.runs.len(),
        "runs_failed": r.failures.len(),
        "failures": r.failures.iter().take(5).collect::<Vec<_>>(),
        "metrics": {
            "spawn_to_first_output_ms": stats_json(s.first),
            "spawn_to_end_ms": stats_json(s.end),
            "instancestart_to_boot_timer_ms": stats_json(s.boot),
            "cpu_ms": stats_json(s.cpu),
            "peak_rss_mib": stats_json(s.rss_mib),
            "vmm_overhead_rss_mib": stats_json(s.overhead_mib),
            "smaps_samples_per_run": stats_json(s.samples),
            "runs_without_smaps_sample": s.runs_without_sample,
        },
        "runs": raw,
    })
}

fn fmt_ms(v: f64) -> String {
    if v >= 1000.0 {
        format!("{:.0}", v)
    } else if v >= 100.0 {
        format!("{:.1}", v)
    } else {
        format!("{:.2}", v)
    }
}

fn triple(s: Option<Stats>) -> String {
    match s {
        Some(s) => format!(
            "{} / {} / {}",
            fmt_ms(s.min),
            fmt_ms(s.median),
            fmt_ms(s.p90)
        ),
        None => "–".into(),
    }
}

fn load1(l: &str) -> &str {
    l.split_whitespace().next().unwrap_or("?")
}

pub fn end_header(label: &str) -> String {
    if label == "exit" {
        String::new()
    } else {
        format!(" (to {label})")
    }
}

/// The Markdown table (and the notes under it).
pub fn markdown_table(results: &[VariantResult]) -> String {
    let mut md = String::new();
    md.push_str("| variant | spawn → first output (ms) | spawn → exit (ms) | InstanceStart → boot timer (ms) | CPU (ms) | peak RSS (MiB) | VMM overhead RSS (MiB) | host load: 1-min avg before → after; CPU idle before |\n");
    md.push_str("|---|---|---|---|---|---|---|---|\n");
    for r in results {
        if let Some(reason) = &r.skipped {
            md.push_str(&format!(
                "| {} | skipped: {} | | | | | | |\n",
                r.name,
                reason.replace('|', "\\|")
            ));
            continue;
        }
        let s = summarize(r);
        let over = match (s.overhead_mib, s.samples) {
            (Some(o), Some(n)) => {
                let mut t = format!(
                    "{:.2} (max; median {:.2}; {:.0} samples/run)",
                    o.max, o.median, n.median
                );
                if s.runs_without_sample > 0 {
                    t.push_str(&format!(
                        "; {} runs ended before the first sample",
                        s.runs_without_sample
                    ));
                }
                t
            }
            (None, Some(_)) if !s.sampled => "not sampled (--no-smaps)".into(),
            (None, Some(_)) => "ended before the first sample".into(),
            _ => "–".into(),
        };
        let end = format!("{}{}", triple(s.end), end_header(&r.end_label));
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} → {}; {} |\n",
            r.name,
            triple(s.first),
            end,
            triple(s.boot),
            s.cpu.map(|c| fmt_ms(c.median)).unwrap_or("–".into()),
            s.rss_mib
                .map(|c| format!("{:.1}", c.median))
                .unwrap_or("–".into()),
            over,
            load1(&r.load_before),
            load1(&r.load_after),
            if r.idle_before.is_finite() {
                format!("{:.0}% idle", r.idle_before)
            } else {
                "–".into()
            },
        ));
    }
    md.push_str("\nTimes are min / median / p90 over the runs (nearest-rank percentiles: always a measured value); CPU and peak RSS are medians.\n");
    let failed: Vec<&VariantResult> = results.iter().filter(|r| !r.failures.is_empty()).collect();
    for r in failed {
        md.push_str(&format!(
            "\n- {}: {} of {} runs failed (left out), first error: {}",
            r.name,
            r.failures.len(),
            r.failures.len() + r.runs.len(),
            r.failures[0]
        ));
    }
    md.push('\n');
    md
}

pub fn markdown(host: &Value, results: &[VariantResult], runs: usize, started: &str) -> String {
    let mut md = String::new();
    md.push_str("# Launch benchmark: microVMs vs containers vs processes\n\n");
    md.push_str(&format!(
        "{started} · {} · kernel {} · {} · {} cores · {} MiB · KVM: {} · load before {} / after {}\n\n",
        host["os"].as_str().unwrap_or(""),
        host["kernel"].as_str().unwrap_or(""),
        host["cpu_model"].as_str().unwrap_or(""),
        host["cores"],
        host["memory_mib"],
        host["kvm"].as_str().unwrap_or(""),
        host["load_before"].as_str().unwrap_or(""),
        host["load_after"].as_str().unwrap_or(""),
    ));
    md.push_str(&format!(
        "{runs} runs per variant (each variant's runs back to back).\n\n"
    ));
    md.push_str(&markdown_table(results));
    md.push_str("\n## Variants\n\n");
    for r in results {
        md.push_str(&format!("- **{}**: {}", r.name, r.description));
        if !r.command.is_empty() {
            md.push_str(&format!("\n  `{}`", r.command));
        }
        for n in &r.notes {
            md.push_str(&format!("\n  - {n}"));
        }
        md.push('\n');
    }
    md.push_str("\n## Versions\n\n");
    if let Some(v) = host["versions"].as_object() {
        for (k, val) in v {
            md.push_str(&format!(
                "- {k}: {}\n",
                val.as_str().unwrap_or("not installed")
            ));
        }
    }
    md
}
