//! `warren-bench report`: medians per scenario and broker from JSON lines, as a Markdown table.
//!
//! Each line is one run: a JSON object with string tags `scenario`, `broker` and optionally
//! `desc`, and numeric results. A result is a metric if its name ends in `_rate` (higher is
//! better), or `_us`, `_ms`, `_mib` or `_kib` (lower is better).

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use serde_json::Value;

use crate::run::thousands;

#[derive(Args, Debug)]
pub struct ReportArgs {
    /// JSON-lines files written by `--json --tag scenario=.. --tag broker=..` runs.
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// The broker compared against (the denominator of the ratio).
    #[arg(long, default_value = "rabbitmq")]
    baseline: String,
    /// The broker being measured (the numerator of the ratio).
    #[arg(long, default_value = "warren")]
    subject: String,
    /// Also check the benchmark issue's targets (scenario names as scripts/bench.sh uses them).
    #[arg(long)]
    targets: bool,
}

/// A goal from the benchmark issue, on the median of one (scenario, metric).
struct Target {
    scenario: &'static str,
    metric: &'static str,
    goal: Goal,
}

enum Goal {
    /// subject / baseline at least this.
    RatioAtLeast(f64),
    /// subject / baseline at most this.
    RatioAtMost(f64),
    /// subject's own value below this.
    Below(f64),
}

const TARGETS: &[Target] = &[
    Target {
        scenario: "S1",
        metric: "consume_rate",
        goal: Goal::RatioAtLeast(5.0),
    },
    Target {
        scenario: "S2",
        metric: "consume_rate",
        goal: Goal::RatioAtLeast(3.0),
    },
    Target {
        scenario: "S3",
        metric: "consume_rate",
        goal: Goal::RatioAtLeast(3.0),
    },
    Target {
        scenario: "S7",
        metric: "consume_rate",
        goal: Goal::RatioAtLeast(3.0),
    },
    Target {
        scenario: "S4",
        metric: "consume_rate",
        goal: Goal::RatioAtLeast(2.0),
    },
    Target {
        scenario: "S8",
        metric: "latency_p99_us",
        goal: Goal::RatioAtMost(0.5),
    },
    Target {
        scenario: "M1",
        metric: "per_connection_kib",
        goal: Goal::Below(20.0),
    },
    Target {
        scenario: "M2",
        metric: "rss_mib",
        goal: Goal::Below(150.0),
    },
    Target {
        scenario: "W2",
        metric: "rss_mib",
        goal: Goal::Below(200.0),
    },
    // Bridges (scripts/bench-bridges.sh): through Warren against the client library direct.
    Target {
        scenario: "B1",
        metric: "confirm_rate",
        goal: Goal::RatioAtLeast(0.9),
    },
    Target {
        scenario: "B2",
        metric: "confirm_rate",
        goal: Goal::RatioAtLeast(0.9),
    },
];

struct Row {
    scenario: String,
    desc: String,
    metric: String,
    values: HashMap<String, Vec<f64>>,
}

fn is_metric(name: &str) -> bool {
    // Maxima are single outliers: kept in the JSON, left out of the medians.
    !name.contains("max")
        && (name.ends_with("_rate")
            || name.ends_with("_us")
            || name.ends_with("_ms")
            || name.ends_with("_mib")
            || name.ends_with("_kib"))
}

pub fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let mid = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    })
}

fn format_value(metric: &str, v: f64) -> String {
    if metric.ends_with("_rate") {
        format!("{} msg/s", thousands(v))
    } else if metric.ends_with("_us") {
        format!("{} µs", thousands(v))
    } else if metric.ends_with("_ms") {
        format!("{} ms", thousands(v))
    } else if metric.ends_with("_mib") {
        format!("{v:.1} MiB")
    } else if metric.ends_with("_kib") {
        format!("{v:.1} KiB")
    } else {
        format!("{v}")
    }
}

pub fn report(args: &ReportArgs) -> Result<()> {
    let mut rows: Vec<Row> = Vec::new();
    for file in &args.files {
        let text =
            std::fs::read_to_string(file).with_context(|| format!("cannot read {file:?}"))?;
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let rec: Value = serde_json::from_str(line)
                .with_context(|| format!("{}:{}: not JSON", file.display(), n + 1))?;
            let Some(obj) = rec.as_object() else { continue };
            let tag = |k: &str| obj.get(k).and_then(Value::as_str).unwrap_or("").to_string();
            let (scenario, broker, desc) = (tag("scenario"), tag("broker"), tag("desc"));
            if scenario.is_empty() || broker.is_empty() {
                continue;
            }
            for (metric, value) in obj {
                let Some(v) = value.as_f64() else { continue };
                if !is_metric(metric) {
                    continue;
                }
                let i = match rows
                    .iter()
                    .position(|r| r.scenario == scenario && &r.metric == metric)
                {
                    Some(i) => i,
                    None => {
                        rows.push(Row {
                            scenario: scenario.clone(),
                            desc: desc.clone(),
                            metric: metric.clone(),
                            values: HashMap::new(),
                        });
                        rows.len() - 1
                    }
                };
                if rows[i].desc.is_empty() {
                    rows[i].desc = desc.clone();
                }
                rows[i].values.entry(broker.clone()).or_default().push(v);
            }
        }
    }
    // One headline rate per scenario: what consumers got if any consumed, else what was
    // confirmed (with confirms), else what was published. The JSON lines keep every figure.
    let has = |rows: &[Row], scenario: &str, metric: &str| {
        rows.iter()
            .any(|r| r.scenario == scenario && r.metric == metric)
    };
    let keep: Vec<bool> = rows
        .iter()
        .map(|r| match r.metric.as_str() {
            "publish_rate" => {
                !has(&rows, &r.scenario, "consume_rate") && !has(&rows, &r.scenario, "confirm_rate")
            }
            "confirm_rate" => !has(&rows, &r.scenario, "consume_rate"),
            _ => true,
        })
        .collect();
    let mut kept = keep.iter();
    rows.retain(|_| *kept.next().unwrap());
    println!(
        "| scenario | what | metric | {} | {} | {} / {} |",
        args.baseline, args.subject, args.subject, args.baseline
    );
    println!("| --- | --- | --- | ---: | ---: | ---: |");
    for row in &rows {
        let cell = |broker: &str| {
            row.values
                .get(broker)
                .and_then(|v| median(v).map(|m| (m, v.len())))
        };
        let base = cell(&args.baseline);
        let subj = cell(&args.subject);
        let show = |c: Option<(f64, usize)>| match c {
            Some((m, n)) if n > 1 => format!("{} (n={n})", format_value(&row.metric, m)),
            Some((m, _)) => format_value(&row.metric, m),
            None => "—".to_string(),
        };
        let ratio = match (base, subj) {
            (Some((b, _)), Some((s, _))) if b > 0.0 => format!("{:.2}×", s / b),
            _ => "—".to_string(),
        };
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            row.scenario,
            row.desc,
            row.metric,
            show(base),
            show(subj),
            ratio
        );
    }
    if args.targets {
        print_targets(args, &rows);
    }
    Ok(())
}

fn print_targets(args: &ReportArgs, rows: &[Row]) {
    println!();
    println!("| target | measured | met |");
    println!("| --- | --- | --- |");
    // Targets of scenarios this file has no figures of at all (another script's) are left out.
    for t in TARGETS
        .iter()
        .filter(|t| rows.iter().any(|r| r.scenario == t.scenario))
    {
        let row = rows
            .iter()
            .find(|r| r.scenario == t.scenario && r.metric == t.metric);
        let med = |broker: &str| {
            row.and_then(|r| r.values.get(broker))
                .and_then(|v| median(v))
        };
        let (subj, base) = (med(&args.subject), med(&args.baseline));
        let (goal, measured, met) = match t.goal {
            Goal::RatioAtLeast(x) | Goal::RatioAtMost(x) => {
                let at_least = matches!(t.goal, Goal::RatioAtLeast(_));
                let goal = format!(
                    "{} {} {} {x}× {}",
                    t.scenario,
                    t.metric,
                    if at_least { "≥" } else { "≤" },
                    args.baseline
                );
                match (subj, base) {
                    (Some(s), Some(b)) if b > 0.0 => {
                        let r = s / b;
                        let met = if at_least { r >= x } else { r <= x };
                        (goal, format!("{r:.2}×"), Some(met))
                    }
                    _ => (goal, "not measured".to_string(), None),
                }
            }
            Goal::Below(x) => {
                let goal = format!(
                    "{} {} < {}",
                    t.scenario,
                    t.metric,
                    format_value(t.metric, x)
                );
                match subj {
                    Some(s) => (goal, format_value(t.metric, s), Some(s < x)),
                    None => (goal, "not measured".to_string(), None),
                }
            }
        };
        let met = match met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "—",
        };
        println!("| {goal} | {measured} | {met} |");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }

    #[test]
    fn metric_names() {
        assert!(is_metric("consume_rate"));
        assert!(is_metric("latency_p99_us"));
        assert!(is_metric("rss_mib"));
        assert!(!is_metric("elapsed_s"));
        assert!(!is_metric("published"));
        assert!(!is_metric("latency_max_us"));
    }
}
