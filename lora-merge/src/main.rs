//! `lora-merge`: a thin command-line front end over the `lora_merge` library.

use anyhow::Result;
use clap::Parser;
use cli::{Cli, Command, MergeArgs};
use lora_merge::{Conversion, LowRankReport, MergeOptions};

mod cli;

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
