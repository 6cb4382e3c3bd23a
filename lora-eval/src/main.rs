//! `lora-eval`: a thin command-line front end over the `lora_eval` library.

use std::path::Path;

use anyhow::Result;
use clap::Parser;
use cli::{Cli, Command, InceptionArgs, MetricsArgs};
use indicatif::{ProgressBar, ProgressStyle};
use lora_core::models::inception::FidInception;
use lora_core::options::{check_output, prepare_output};
use lora_eval::extract::Skipped;
use lora_eval::extract::{feature_set, ExtractOptions, Phase};
use lora_eval::report::MetricsReport;
use lora_eval::stats::FeatureSet;

mod cli;
mod run_compare;

fn main() -> Result<()> {
    // SAFETY: first thing in `main`, before any other thread exists.
    unsafe { lora_core::process_setup::configure() };
    match Cli::parse().command {
        Command::Metrics(args) => metrics(args),
        Command::Compare(args) => run_compare::run(args),
    }
}

fn metrics(args: MetricsArgs) -> Result<()> {
    if let Some(stats) = &args.save_stats {
        check_output(
            "--save-stats",
            stats,
            &[("--real", &args.real), ("--fake", &args.fake)],
        )?;
        prepare_output("--save-stats", stats, args.overwrite)?;
    }
    if let Some(note) = args.inception.device.auto_note() {
        eprintln!("{note}");
    }
    let device = args.inception.device.open()?;
    let model = FidInception::load(&args.inception.inception, &device)?;
    let mut skipped = Vec::new();
    let real = processed_set(
        &args.real,
        "real",
        &model,
        &device,
        &args.inception,
        &mut skipped,
    )?;
    if let Some(stats) = &args.save_stats {
        real.save(stats)?;
        eprintln!("saved the --real statistics to {}", stats.display());
    }
    let fake = processed_set(
        &args.fake,
        "fake",
        &model,
        &device,
        &args.inception,
        &mut skipped,
    )?;
    let mut report = MetricsReport::new(
        &real,
        &fake,
        &args.sampling.settings(),
        &args.inception.inception,
        model.weights_sha256(),
        skipped,
    )?;
    if let Some(clip) = &args.clip.clip {
        let Some(prompts) = &args.prompts else {
            anyhow::bail!("--clip needs --prompts FILE: the prompt of each generated image");
        };
        let files = lora_eval::images::list_images(&args.fake)?;
        let prompts = lora_eval::prompts::prompts_for_images(&files, prompts)?;
        let score = lora_eval::clip_score::clip_score_of_files(clip, &files, &prompts, &device)?;
        report.set_clip_score(clip, score);
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    for warning in &report.warnings {
        eprintln!("warning: {warning}");
    }
    Ok(())
}

/// A set from the command line, with a progress bar while its images go through the network.
pub fn processed_set(
    path: &Path,
    name: &str,
    model: &FidInception,
    device: &candle_core::Device,
    args: &InceptionArgs,
    skipped: &mut Vec<Skipped>,
) -> Result<FeatureSet> {
    let bar = ProgressBar::hidden();
    let options = ExtractOptions {
        batch_size: args.batch_size,
        skip_bad: args.skip_bad,
    };
    let (set, bad) = feature_set(path, model, device, options, &mut |phase| match phase {
        Phase::Start(n) => {
            bar.set_length(n as u64);
            bar.set_style(
                ProgressStyle::with_template(&format!(
                    "{name}: {{pos}}/{{len}} images {{bar:30}} {{elapsed}}"
                ))
                .expect("valid template"),
            );
            bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
        }
        Phase::Done(done) => bar.set_position(done as u64),
    })?;
    bar.finish_and_clear();
    skipped.extend(bad);
    Ok(set)
}
