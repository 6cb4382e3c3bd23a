//! Per-step metrics as JSON lines, and the end-of-run summary.
//!
//! The metrics file is a log, appended and flushed line by line (not written atomically): after
//! a crash or a NaN stop it shows what happened up to that point. A resumed run keeps the lines up
//! to its checkpoint's step (dropping those of steps it is about to redo) and appends; the cut log
//! replaces the old one atomically, so a run killed at any moment loses no step before its
//! checkpoint.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::Serialize;

/// What one optimizer step did.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct StepReport {
    /// 1-based: the number of optimizer steps done after this one.
    pub step: usize,
    /// Mean (min-SNR-weighted) MSE over the step's micro-batches.
    pub loss: f64,
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Wall time of the step.
    pub seconds: f64,
    /// Of that, the wall time of summing the gradients across processes, waiting for the
    /// slowest included (runs through a collective only: MPI, or NCCL also for one process).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reduce_seconds: Option<f64>,
}

pub struct MetricsLog {
    path: PathBuf,
    out: BufWriter<File>,
}

impl MetricsLog {
    /// A fresh log (an existing file is replaced).
    pub fn create(path: &Path) -> Result<Self> {
        let file = File::create(path)
            .with_context(|| format!("cannot create metrics file {}", path.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            out: BufWriter::new(file),
        })
    }

    /// The existing log (if any) cut after `step`, continued. Truncating the file in place and
    /// writing the kept lines back would lose them all to a kill in between (or before the
    /// buffer's first flush, a step later); the cut log is written atomically instead.
    pub fn resume(path: &Path, step: usize) -> Result<Self> {
        let kept: String = match std::fs::read_to_string(path) {
            Ok(text) => text
                .lines()
                .filter(|line| {
                    serde_json::from_str::<serde_json::Value>(line)
                        .ok()
                        .and_then(|v| v["step"].as_u64())
                        .is_some_and(|s| s as usize <= step)
                })
                .map(|line| format!("{line}\n"))
                .collect(),
            Err(_) => String::new(),
        };
        lora_core::io::write_atomic(path, |temp| Ok(std::fs::write(temp, kept)?))?;
        let file = OpenOptions::new()
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open metrics file {}", path.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            out: BufWriter::new(file),
        })
    }

    pub fn write(&mut self, report: &StepReport) -> Result<()> {
        self.write_row(report)
    }

    /// One JSON line of any other kind (the sample scores). It needs a `step` key: a resume keeps
    /// or drops rows by it.
    pub fn write_row<T: Serialize>(&mut self, row: &T) -> Result<()> {
        let line = serde_json::to_string(row)?;
        writeln!(self.out, "{line}")
            .and_then(|()| self.out.flush())
            .with_context(|| format!("cannot write metrics to {}", self.path.display()))
    }
}

/// The end-of-run numbers.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrainSummary {
    /// Steps this invocation ran (after a resume: not counting the steps before it).
    pub steps_run: usize,
    /// The step count reached.
    pub final_step: usize,
    pub first_loss: Option<f64>,
    pub last_loss: Option<f64>,
    pub mean_step_seconds: f64,
    pub images_per_second: f64,
    /// Peak resident memory of the process (Linux's VmHWM); GPU memory is not measured.
    pub peak_rss_bytes: Option<u64>,
    pub output: PathBuf,
    /// `--ema-decay`: the moving average's adapter.
    pub ema_output: Option<PathBuf>,
    /// The validation loss first and last computed in this invocation (`--validation-data`,
    /// `--validation-split`).
    pub first_val_loss: Option<f64>,
    pub last_val_loss: Option<f64>,
}

/// The process's peak resident set size, where the OS reports it.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(step: usize) -> StepReport {
        StepReport {
            step,
            loss: 0.5,
            lr: 1e-4,
            grad_norm: 1.0,
            seconds: 0.1,
            reduce_seconds: None,
        }
    }

    /// A run killed after resuming but before logging a step (its first step takes a while)
    /// must find the log cut back, not emptied: the cut log is on disk before `resume` returns.
    #[test]
    fn resume_puts_the_kept_lines_on_disk_at_once() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("metrics.jsonl");
        let mut log = MetricsLog::create(&path)?;
        for step in 1..=3 {
            log.write(&report(step))?;
        }
        drop(log);
        std::fs::write(&path, std::fs::read_to_string(&path)? + "{\"step\":4,\"lo")?;

        let mut log = MetricsLog::resume(&path, 2)?;
        let on_disk = std::fs::read_to_string(&path)?;
        assert_eq!(on_disk.lines().count(), 2, "{on_disk}");
        assert!(on_disk.ends_with('\n'), "{on_disk}");
        log.write(&report(3))?;
        let steps: Vec<u64> = std::fs::read_to_string(&path)?
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(steps, [1, 2, 3]);
        assert_eq!(
            std::fs::read_dir(dir.path())?.count(),
            1,
            "temporary file left"
        );
        Ok(())
    }
}
