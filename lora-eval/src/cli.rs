//! The command line of `lora-eval`: every flag and its value type.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use lora_eval::lora_core::models::config::PredictionType;
use lora_eval::lora_core::options::{AdapterSpec, DeviceSpec, Precision};
use lora_eval::lora_core::source::{BASE_CONFIG_HELP, NO_EMA_HELP, PREDICTION_TYPE_HELP};
use lora_eval::metrics::SamplingSettings;

/// Score generated images and adapters: FID, IS, KID (FID Inception-v3) and CLIP score.
#[derive(Parser)]
#[command(name = "lora-eval", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// FID, IS and KID of a generated set against a reference set, and CLIP score on request.
    Metrics(MetricsArgs),
    /// Generate every prompt × seed with the base model and with each adapter from the same
    /// noise, score each against a reference set, and draw a side-by-side grid.
    Compare(CompareArgs),
}

/// The FID network and how images go through it.
#[derive(Args)]
pub struct InceptionArgs {
    /// pytorch-fid's Inception weights (`pt_inception-2015-12-05`) as .safetensors
    /// (scripts/convert_fid_inception.py converts the .pth).
    #[arg(long, value_name = "FILE")]
    pub inception: PathBuf,
    /// Images per network batch.
    #[arg(long, default_value_t = 50)]
    pub batch_size: usize,
    /// auto (CUDA when built with it and a GPU is present, else the CPU), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: DeviceSpec,
    /// Leave out images that cannot be read (each is listed) instead of stopping at the first.
    #[arg(long)]
    pub skip_bad: bool,
}

/// How IS and KID sample (torch-fidelity's defaults).
#[derive(Args)]
pub struct ScoreSamplingArgs {
    /// Inception Score splits.
    #[arg(long, default_value_t = 10)]
    pub is_splits: usize,
    /// Shuffle before splitting as torch-fidelity does (its default seed is 2020); without it
    /// the splits follow the sorted file order.
    #[arg(long, value_name = "SEED")]
    pub is_shuffle: Option<u32>,
    /// KID: how many random subsets are drawn from each set.
    #[arg(long, default_value_t = 100)]
    pub kid_subsets: usize,
    /// KID: images per subset, capped at the smaller set's size.
    #[arg(long, default_value_t = 1000)]
    pub kid_subset_size: usize,
    /// KID: the seed of the subsets (numpy's RandomState, so torch-fidelity with the same seed
    /// draws the same subsets).
    #[arg(long, default_value_t = 2020)]
    pub kid_seed: u32,
}

impl ScoreSamplingArgs {
    pub fn settings(&self) -> SamplingSettings {
        SamplingSettings {
            is_splits: self.is_splits,
            is_shuffle: self.is_shuffle,
            kid_subsets: self.kid_subsets,
            kid_subset_size: self.kid_subset_size,
            kid_seed: self.kid_seed,
        }
    }
}

/// The CLIP score's model.
#[derive(Args)]
pub struct ClipArgs {
    /// CLIP model for the CLIP score: a transformers folder or a Hub id (alone:
    /// openai/clip-vit-large-patch14).
    #[arg(long, value_name = "MODEL", num_args = 0..=1,
          default_missing_value = lora_eval::DEFAULT_CLIP_MODEL)]
    pub clip: Option<String>,
}

#[derive(Args)]
pub struct MetricsArgs {
    /// Reference images: a folder, or statistics saved with --save-stats.
    #[arg(long, value_name = "DIR|FILE")]
    pub real: PathBuf,
    /// Generated images: a folder, or statistics saved with --save-stats.
    #[arg(long, value_name = "DIR|FILE")]
    pub fake: PathBuf,
    #[command(flatten)]
    pub inception: InceptionArgs,
    #[command(flatten)]
    pub sampling: ScoreSamplingArgs,
    #[command(flatten)]
    pub clip: ClipArgs,
    /// The prompt of each generated image, for the CLIP score: one line per image in file-name
    /// order, one line for all, or a metadata.jsonl (`file_name` and `text`).
    #[arg(long, value_name = "FILE")]
    pub prompts: Option<PathBuf>,
    /// Save the --real folder's features and statistics here, to pass as --real next time.
    #[arg(long, value_name = "FILE")]
    pub save_stats: Option<PathBuf>,
    /// Replace an existing --save-stats file.
    #[arg(long)]
    pub overwrite: bool,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct CompareArgs {
    /// Base model: a diffusers folder, a Hub id or a single-file checkpoint.
    #[arg(long)]
    pub base: String,
    #[arg(long, value_name = "DIR", help = BASE_CONFIG_HELP)]
    pub base_config: Option<PathBuf>,
    #[arg(long, value_name = "TYPE", help = PREDICTION_TYPE_HELP)]
    pub prediction_type: Option<PredictionType>,
    #[arg(long, help = NO_EMA_HELP)]
    pub no_ema: bool,
    /// An adapter to compare, FILE[:SCALE] (repeatable; each is one column).
    #[arg(long = "lora", value_name = "FILE[:SCALE]", required = true)]
    pub loras: Vec<AdapterSpec>,
    /// Prompts, one per line (each is one row of the grid).
    #[arg(long, value_name = "FILE")]
    pub prompts: PathBuf,
    /// Images per prompt; image i of every prompt and every column uses seed --seed + i.
    #[arg(long, default_value_t = 4)]
    pub seeds: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Reference images (a folder, or statistics saved by `metrics --save-stats`).
    #[arg(long, value_name = "DIR|FILE")]
    pub reference: PathBuf,
    #[command(flatten)]
    pub inception: InceptionArgs,
    #[command(flatten)]
    pub sampling: ScoreSamplingArgs,
    #[command(flatten)]
    pub clip: ClipArgs,
    /// Folder for the images, report.json, grid.png and the metric plots.
    #[arg(long, value_name = "DIR")]
    pub output: PathBuf,
    /// Replace an existing output folder's report and images.
    #[arg(long)]
    pub overwrite: bool,
    #[command(flatten)]
    pub generation: lora_infer::SamplingArgs,
    #[arg(long, default_value = "f32")]
    pub precision: Precision,
    /// Read PyTorch pickles (.ckpt/.pt/.bin) for --base and --lora (never runs their code).
    #[arg(long)]
    pub allow_pickle: bool,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Cli;

    /// clap checks a definition (unique argument and group names, …) only when it parses that
    /// subcommand; this checks them all.
    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }
}
