//! What `lora-eval metrics` prints: the scores, the image counts, and every setting that
//! changes a score (so two reports can be told comparable or not).

use std::fmt::Write;
use std::path::Path;

use anyhow::Result;
use serde::Serialize;

use crate::extract::{Skipped, RESIZE_NAME};
use crate::metrics::{scores, SamplingSettings, Scores};
use crate::stats::FeatureSet;

#[derive(Debug, Clone, Serialize)]
pub struct MetricsReport {
    #[serde(flatten)]
    pub scores: Scores,
    /// 100 · max(mean cos(image, prompt), 0), when asked for.
    pub clip_score: Option<f64>,
    pub settings: ReportSettings,
    /// Images left out with --skip-bad, and why.
    pub skipped: Vec<Skipped>,
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReportSettings {
    pub real: String,
    pub fake: String,
    pub inception: String,
    pub inception_sha256: Option<String>,
    pub resize: &'static str,
    #[serde(flatten)]
    pub sampling: SamplingSettings,
    pub clip_model: Option<String>,
}

impl MetricsReport {
    pub fn new(
        real: &FeatureSet,
        fake: &FeatureSet,
        sampling: &SamplingSettings,
        inception: &Path,
        inception_sha256: Option<&str>,
        skipped: Vec<Skipped>,
    ) -> Result<Self> {
        let mut scores = scores(real, fake, sampling)?;
        let mut warnings = std::mem::take(&mut scores.warnings);
        for set in [real, fake] {
            let saved = set.metadata.get("inception_sha256");
            if let (Some(saved), Some(now)) = (saved, inception_sha256) {
                if saved != now {
                    warnings.push(format!(
                        "{} was computed with other Inception weights (sha256 {saved}) than \
                         --inception (sha256 {now}): the scores are not comparable",
                        set.origin
                    ));
                }
            }
        }
        Ok(Self {
            scores,
            clip_score: None,
            settings: ReportSettings {
                real: real.origin.clone(),
                fake: fake.origin.clone(),
                inception: inception.display().to_string(),
                inception_sha256: inception_sha256.map(str::to_owned),
                resize: RESIZE_NAME,
                sampling: sampling.clone(),
                clip_model: None,
            },
            skipped,
            warnings,
        })
    }

    pub fn set_clip_score(&mut self, model: &str, score: f64) {
        self.clip_score = Some(score);
        self.settings.clip_model = Some(model.to_owned());
    }

    /// The human-readable form.
    pub fn table(&self) -> String {
        let s = &self.scores;
        let pair = |mean: Option<f64>, std: Option<f64>| match (mean, std) {
            (Some(m), Some(d)) => format!("{m:.6} ± {d:.6}"),
            _ => "not computed (see warnings)".to_owned(),
        };
        let mut out = String::new();
        let mut row = |name: &str, value: String| {
            let _ = writeln!(out, "{name:<12} {value}");
        };
        row("FID", format!("{:.6}", s.fid));
        row("IS", pair(s.is_mean, s.is_std));
        row("KID", pair(s.kid_mean, s.kid_std));
        if let (Some(score), Some(model)) = (self.clip_score, &self.settings.clip_model) {
            row("CLIP score", format!("{score:.4} ({model})"));
        }
        row(
            "real",
            format!("{} images ({})", s.real_images, self.settings.real),
        );
        row(
            "fake",
            format!("{} images ({})", s.fake_images, self.settings.fake),
        );
        row(
            "inception",
            match &self.settings.inception_sha256 {
                Some(sha) => format!("{} (sha256 {sha})", self.settings.inception),
                None => self.settings.inception.clone(),
            },
        );
        for skipped in &self.skipped {
            row("skipped", format!("{}: {}", skipped.file, skipped.error));
        }
        out
    }
}
