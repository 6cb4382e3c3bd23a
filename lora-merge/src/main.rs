//! `lora-merge`: a thin command-line front end over the `lora_merge` library.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use lora_merge::{
    AdapterSpec, Conversion, DynamicRank, LowRankReport, MergeOptions, OutputDtype, OutputLayout,
};

/// Fold LoRA adapters into checkpoints; SVD merge, resize, extract and inspect adapters.
///
/// Without a subcommand, the arguments are those of `merge`.
#[derive(Parser)]
#[command(name = "lora-merge", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    merge: Option<MergeArgs>,
}

#[derive(Subcommand)]
enum Command {
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
struct MergeArgs {
    /// Base model: a diffusers folder or a single-file LDM checkpoint (.safetensors).
    #[arg(long)]
    base: PathBuf,
    /// Adapter file (kohya/PEFT LoRA or LoCon, LyCORIS LoHa/LoKr), optionally with a weight:
    /// FILE[:WEIGHT]. Repeatable; may be left out with --to (a plain layout conversion).
    #[arg(long = "lora", required_unless_present = "to")]
    loras: Vec<AdapterSpec>,
    /// Output: a new folder (diffusers) or file (single-file), as the base unless --to says.
    #[arg(long)]
    output: PathBuf,
    /// Output layout: diffusers or single-file (default: the base's).
    #[arg(long)]
    to: Option<OutputLayout>,
    /// Diffusers folder whose config, tokenizer and scheduler files go into the output; needed
    /// for --to diffusers from a single file.
    #[arg(long)]
    config_from: Option<PathBuf>,
    /// Floating-point dtype of the output (fp16, bf16, fp32); default: as stored.
    #[arg(long)]
    dtype: Option<OutputDtype>,
    /// Warn about adapter modules that match nothing in the base instead of failing.
    #[arg(long)]
    allow_unmatched: bool,
}

#[derive(Args)]
struct SvdArgs {
    /// Adapter file with optional weight: FILE[:WEIGHT]. Repeatable.
    #[arg(long = "lora", required = true)]
    loras: Vec<AdapterSpec>,
    /// Rank of the result (the cap with --dynamic).
    #[arg(long)]
    rank: usize,
    /// Keep fewer singular values per module: fro:P (Frobenius share P).
    #[arg(long)]
    dynamic: Option<DynamicRank>,
    #[arg(long)]
    output: PathBuf,
}

#[derive(Args)]
struct ResizeArgs {
    #[arg(long)]
    lora: PathBuf,
    /// New rank (the cap with --dynamic).
    #[arg(long)]
    rank: Option<usize>,
    /// sv_fro:P, sv_ratio:R or sv_cumulative:P, as kohya's resize_lora.py.
    #[arg(long)]
    dynamic: Option<DynamicRank>,
    #[arg(long)]
    output: PathBuf,
}

#[derive(Args)]
struct ExtractArgs {
    #[arg(long)]
    base: PathBuf,
    #[arg(long)]
    tuned: PathBuf,
    #[arg(long)]
    rank: usize,
    /// Skip modules whose largest absolute weight change is at most this.
    #[arg(long, default_value_t = 0.0)]
    min_diff: f64,
    #[arg(long)]
    output: PathBuf,
}

#[derive(Args)]
struct InspectArgs {
    file: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

fn main() -> Result<()> {
    // SAFETY: first thing in `main`, before any other thread exists.
    unsafe { lora_core::process_setup::configure() };
    let cli = Cli::parse();
    match (cli.command, cli.merge) {
        (Some(Command::Merge(args)), _) | (None, Some(args)) => run_merge(args),
        (Some(Command::Svd(args)), _) => {
            let report = lora_merge::svd_merge(&args.loras, args.rank, args.dynamic, &args.output)?;
            print_low_rank("svd", &report, &args.output);
            Ok(())
        }
        (Some(Command::Resize(args)), _) => {
            let report = lora_merge::resize(&args.lora, args.rank, args.dynamic, &args.output)?;
            print_low_rank("resize", &report, &args.output);
            Ok(())
        }
        (Some(Command::Extract(args)), _) => {
            let report = lora_merge::extract(
                &args.base,
                &args.tuned,
                args.rank,
                args.min_diff,
                &args.output,
            )?;
            print_low_rank("extract", &report, &args.output);
            Ok(())
        }
        (Some(Command::Inspect(args)), _) => {
            let inspection = lora_merge::inspect(&args.file)?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&inspection.to_json())?);
            } else {
                print!("{}", inspection.to_text());
            }
            Ok(())
        }
        (None, None) => {
            anyhow::bail!("nothing to do: pass merge arguments (--base, --lora, --output) or a subcommand; see --help")
        }
    }
}

fn run_merge(args: MergeArgs) -> Result<()> {
    anyhow::ensure!(
        args.config_from.is_none() || args.to.is_some(),
        "--config-from is used only with --to"
    );
    let conversion = args.to.map(|to| Conversion {
        to,
        config_from: args.config_from,
    });
    let report = lora_merge::merge_converting(
        &MergeOptions {
            base: args.base,
            adapters: args.loras,
            output: args.output.clone(),
            dtype: args.dtype,
            allow_unmatched: args.allow_unmatched,
        },
        conversion.as_ref(),
    )?;
    for unmatched in &report.unmatched {
        eprintln!("warning: skipped {unmatched}");
    }
    for (path, n) in &report.merged_modules {
        println!("{}: {n} modules merged", path.display());
    }
    println!(
        "wrote {} ({} tensors changed)",
        args.output.display(),
        report.tensors_changed
    );
    Ok(())
}

fn print_low_rank(operation: &str, report: &LowRankReport, output: &std::path::Path) {
    for name in &report.skipped {
        println!("skipped {name}: below --min-diff");
    }
    let ranks: std::collections::BTreeSet<usize> =
        report.modules.iter().map(|m| m.new_rank).collect();
    println!(
        "{operation}: wrote {} ({} modules, ranks {:?}); retained Frobenius energy {:.4}%",
        output.display(),
        report.modules.len(),
        ranks,
        report.energy_kept() * 100.0
    );
}
