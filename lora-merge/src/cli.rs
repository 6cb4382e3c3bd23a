//! The command line of `lora-merge`: its subcommands, every flag and its value type.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use lora_core::options::{AdapterSpec, Precision};
use lora_core::source::NO_EMA_HELP;
use lora_merge::{DynamicRank, OutputLayout};

/// Fold LoRA adapters into checkpoints; SVD merge, resize, extract and inspect adapters.
///
/// Without a subcommand, the arguments are those of `merge`.
#[derive(Parser)]
#[command(name = "lora-merge", version, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub merge: Option<MergeArgs>,
}

#[derive(Subcommand)]
pub enum Command {
    /// Fold adapters into a base model (diffusers folder or single-file LDM .safetensors).
    Merge(MergeArgs),
    /// Sum adapters' ΔW exactly and re-factor by truncated SVD.
    Svd(SvdArgs),
    /// Change an adapter's rank, keeping its effective scale.
    Resize(ResizeArgs),
    /// Build an adapter from the difference of two checkpoints.
    Extract(ExtractArgs),
    /// Describe an adapter file.
    Inspect(InspectArgs),
}

#[derive(Args)]
pub struct MergeArgs {
    /// Base model: a diffusers folder or a single-file LDM checkpoint (.safetensors).
    #[arg(long)]
    pub base: PathBuf,
    /// Adapter file (kohya/PEFT LoRA or LoCon, LyCORIS LoHa/LoKr), optionally with a scale:
    /// FILE[:SCALE]. Repeatable; may be left out with --to (a plain layout conversion).
    #[arg(
        long = "lora",
        value_name = "FILE[:SCALE]",
        required_unless_present = "to"
    )]
    pub loras: Vec<AdapterSpec>,
    /// Output: a new folder (diffusers) or file (single-file), as the base unless --to says.
    #[arg(long)]
    pub output: PathBuf,
    /// Output layout: diffusers or single-file (default: the base's).
    #[arg(long)]
    pub to: Option<OutputLayout>,
    /// Diffusers folder whose config, tokenizer and scheduler files go into the output; needed
    /// for --to diffusers from a single file.
    #[arg(long)]
    pub config_from: Option<PathBuf>,
    #[arg(long, help = NO_EMA_HELP)]
    pub no_ema: bool,
    /// Floating-point dtype of the output (f16, bf16, f32); default: as stored.
    #[arg(long)]
    pub dtype: Option<Precision>,
    /// Warn about adapter modules that match nothing in the base instead of failing.
    #[arg(long)]
    pub allow_unmatched: bool,
    /// Accept NaN or infinity in the adapters and the base, and write what they give (refused by
    /// default: such a checkpoint draws nothing).
    #[arg(long)]
    pub allow_nonfinite: bool,
    /// Replace an existing output file (without it, it is refused).
    #[arg(long)]
    pub overwrite: bool,
    /// Read PyTorch pickle inputs (.ckpt, .pt, .bin) through a safetensors copy in the cache,
    /// made by a reader that never executes anything from the file [default: refused].
    #[arg(long)]
    pub allow_pickle: bool,
}

#[derive(Args)]
pub struct SvdArgs {
    /// Adapter file with an optional scale: FILE[:SCALE]. Repeatable.
    #[arg(long = "lora", value_name = "FILE[:SCALE]", required = true)]
    pub loras: Vec<AdapterSpec>,
    /// Rank of the result (the cap with --dynamic).
    #[arg(long)]
    pub rank: usize,
    /// Keep fewer singular values per module: fro:P (Frobenius share P).
    #[arg(long)]
    pub dynamic: Option<DynamicRank>,
    #[arg(long)]
    pub output: PathBuf,
    /// Replace an existing output file (without it, it is refused).
    #[arg(long)]
    pub overwrite: bool,
    /// Read PyTorch pickle inputs (.ckpt, .pt, .bin) through a safetensors copy in the cache,
    /// made by a reader that never executes anything from the file [default: refused].
    #[arg(long)]
    pub allow_pickle: bool,
}

#[derive(Args)]
pub struct ResizeArgs {
    #[arg(long)]
    pub lora: PathBuf,
    /// New rank (the cap with --dynamic).
    #[arg(long)]
    pub rank: Option<usize>,
    /// sv_fro:P, sv_ratio:R or sv_cumulative:P, as kohya's resize_lora.py.
    #[arg(long)]
    pub dynamic: Option<DynamicRank>,
    #[arg(long)]
    pub output: PathBuf,
    /// Replace an existing output file (without it, it is refused).
    #[arg(long)]
    pub overwrite: bool,
    /// Read PyTorch pickle inputs (.ckpt, .pt, .bin) through a safetensors copy in the cache,
    /// made by a reader that never executes anything from the file [default: refused].
    #[arg(long)]
    pub allow_pickle: bool,
}

#[derive(Args)]
pub struct ExtractArgs {
    #[arg(long)]
    pub base: PathBuf,
    #[arg(long)]
    pub tuned: PathBuf,
    #[arg(long)]
    pub rank: usize,
    /// Skip modules whose largest absolute weight change is at most this.
    #[arg(long, default_value_t = 0.0)]
    pub min_diff: f64,
    #[arg(long)]
    pub output: PathBuf,
    /// Replace an existing output file (without it, it is refused).
    #[arg(long)]
    pub overwrite: bool,
    /// Read PyTorch pickle inputs (.ckpt, .pt, .bin) through a safetensors copy in the cache,
    /// made by a reader that never executes anything from the file [default: refused].
    #[arg(long)]
    pub allow_pickle: bool,
}

#[derive(Args)]
pub struct InspectArgs {
    pub file: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// Read a PyTorch pickle file (.pt, .bin) through a safetensors copy in the cache, made by
    /// a reader that never executes anything from the file [default: refused].
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
