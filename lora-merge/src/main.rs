//! `lora-merge`: a thin command-line front end over the `lora_merge` library.

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Parser;
use cli::{Cli, Command, MergeArgs};
use lora_core::options::{prepare_output, AdapterSpec};
use lora_merge::{Conversion, LowRankReport, MergeOptions, OutputLayout};

mod cli;

fn main() -> Result<()> {
    // SAFETY: first thing in `main`, before any other thread exists.
    unsafe { lora_core::process_setup::configure() };
    let cli = Cli::parse();
    match (cli.command, cli.merge) {
        (Some(Command::Merge(args)), _) | (None, Some(args)) => run_merge(args),
        (Some(Command::Svd(args)), _) => {
            let loras = readable_adapters(&args.loras, args.allow_pickle)?;
            prepare_output("--output", &args.output, args.overwrite)?;
            let report = lora_merge::svd_merge(&loras, args.rank, args.dynamic, &args.output)?;
            print_low_rank("svd", &report, &args.output);
            Ok(())
        }
        (Some(Command::Resize(args)), _) => {
            let lora = readable("--lora", &args.lora, args.allow_pickle)?;
            prepare_output("--output", &args.output, args.overwrite)?;
            let report = lora_merge::resize(&lora, args.rank, args.dynamic, &args.output)?;
            print_low_rank("resize", &report, &args.output);
            Ok(())
        }
        (Some(Command::Extract(args)), _) => {
            let base = readable("--base", &args.base, args.allow_pickle)?;
            let tuned = readable("--tuned", &args.tuned, args.allow_pickle)?;
            prepare_output("--output", &args.output, args.overwrite)?;
            let report =
                lora_merge::extract(&base, &tuned, args.rank, args.min_diff, &args.output)?;
            print_low_rank("extract", &report, &args.output);
            Ok(())
        }
        (Some(Command::Inspect(args)), _) => {
            let file = readable("the file", &args.file, args.allow_pickle)?;
            let inspection = lora_merge::inspect(&file)?;
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
    anyhow::ensure!(
        !args.no_ema || args.to == Some(OutputLayout::Diffusers),
        "--no-ema is used only with --to diffusers (a single-file output keeps both UNet copies, \
         each merged)"
    );
    let conversion = args.to.map(|to| Conversion {
        to,
        config_from: args.config_from,
        no_ema: args.no_ema,
    });
    let base = if args.base.is_file() {
        readable("--base", &args.base, args.allow_pickle)?
    } else {
        args.base
    };
    let adapters = readable_adapters(&args.loras, args.allow_pickle)?;
    prepare_output("--output", &args.output, args.overwrite)?;
    let report = lora_merge::merge_converting(
        &MergeOptions {
            base,
            adapters,
            output: args.output.clone(),
            dtype: args.dtype,
            allow_unmatched: args.allow_unmatched,
            allow_nonfinite: args.allow_nonfinite,
        },
        conversion.as_ref(),
    )?;
    for unmatched in &report.unmatched {
        eprintln!("warning: skipped {unmatched}");
    }
    for non_finite in &report.non_finite {
        eprintln!("warning: {non_finite}");
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

/// The file to read for the input `flag` names: itself, or a pickle's safetensors copy with
/// `--allow-pickle` (said on stderr); a pickle without it is refused.
fn readable(flag: &str, path: &Path, allow_pickle: bool) -> Result<PathBuf> {
    let readable = lora_core::io::pickle::safetensors_path(path, allow_pickle)?;
    announce_copy(flag, path, &readable);
    Ok(readable)
}

fn readable_adapters(specs: &[AdapterSpec], allow_pickle: bool) -> Result<Vec<AdapterSpec>> {
    specs
        .iter()
        .map(|spec| {
            let readable = spec.readable(allow_pickle)?;
            announce_copy("--lora", &spec.path, &readable.path);
            Ok(readable)
        })
        .collect()
}

fn announce_copy(flag: &str, given: &Path, read: &Path) {
    if read != given {
        eprintln!(
            "reading {flag} {} through its safetensors copy {}",
            given.display(),
            read.display()
        );
    }
}
