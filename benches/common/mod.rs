//! What the single-case benchmark binaries share: their command line (`<case> [--flag value]…`,
//! cargo's own `--bench` dropped) and how a case is timed.
#![allow(dead_code)] // each benchmark uses a different subset

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{Context, Result};

pub struct BenchArgs {
    pub case: String,
    args: Vec<String>,
}

impl BenchArgs {
    /// The process's arguments; `usage` is the error when no case is named.
    pub fn from_env(usage: &str) -> Result<Self> {
        let args: Vec<String> = std::env::args()
            .skip(1)
            .filter(|a| a != "--bench")
            .collect();
        let case = args.first().context(usage.to_owned())?.clone();
        Ok(Self { case, args })
    }

    /// The value after `name`, if the flag is given.
    pub fn flag(&self, name: &str) -> Result<Option<&str>> {
        match self.args.iter().position(|a| a == name) {
            Some(i) => Ok(Some(
                self.args
                    .get(i + 1)
                    .with_context(|| format!("{name} needs a value"))?,
            )),
            None => Ok(None),
        }
    }

    /// Whether the switch `name` (a flag without value) is given.
    pub fn switch(&self, name: &str) -> bool {
        self.args.iter().any(|a| a == name)
    }

    /// `--iters N`, 3 by default.
    pub fn iters(&self) -> Result<usize> {
        Ok(self.flag("--iters")?.map_or(Ok(3), str::parse)?)
    }
}

/// Mean and minimum seconds of `iters` calls of `run` (warm-ups are the caller's).
pub fn time_runs(iters: usize, mut run: impl FnMut() -> Result<()>) -> Result<(f64, f64)> {
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t0 = Instant::now();
        run()?;
        times.push(t0.elapsed().as_secs_f64());
    }
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    let min = times.iter().copied().fold(f64::INFINITY, f64::min);
    Ok((mean, min))
}

/// Peak resident set size of this process (Linux `VmHWM`), in MiB.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Prints a CPU case's JSON line: `case`, `impl`, `device`, `iters`, `mean_s`, `min_s`,
/// `peak_rss_mib` and the case's `extra` fields.
pub fn print_cpu_report(
    case: &str,
    iters: usize,
    (mean, min): (f64, f64),
    extra: &[(&'static str, serde_json::Value)],
) -> Result<()> {
    let threads = candle_core::utils::get_num_threads();
    let mut out = BTreeMap::from([
        ("case", serde_json::json!(case)),
        ("impl", serde_json::json!("lora-toolkit (candle)")),
        (
            "device",
            serde_json::json!(format!("cpu, {threads} threads")),
        ),
        ("iters", serde_json::json!(iters)),
        ("mean_s", serde_json::json!(mean)),
        ("min_s", serde_json::json!(min)),
    ]);
    if let Some(mib) = peak_rss_mib() {
        out.insert("peak_rss_mib", serde_json::json!(mib));
    }
    out.extend(extra.iter().cloned());
    println!("{}", serde_json::to_string(&out)?);
    Ok(())
}
