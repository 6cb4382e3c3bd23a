//! `lora-eval compare`: options from the command line, progress bars, the report written.

use std::path::Path;

use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};
use lora_core::options::{check_output, prepare_output};
use lora_core::source::{BaseChoices, BaseSpec};
use lora_eval::compare::{compare, CompareEvent, CompareJob};
use lora_eval::extract::{ExtractOptions, Phase};
use lora_eval::prompts::read_prompt_lines;
use lora_infer::GenerateOptions;

use crate::cli::CompareArgs;

pub fn run(args: CompareArgs) -> Result<()> {
    let report_path = args.output.join("report.json");
    let inputs: Vec<(&str, &Path)> = [
        ("--reference", args.reference.as_path()),
        ("--prompts", args.prompts.as_path()),
        ("--inception", args.inception.inception.as_path()),
    ]
    .into_iter()
    .chain(args.loras.iter().map(|a| ("--lora", a.path.as_path())))
    .collect();
    check_output("--output", &args.output, &inputs)?;
    prepare_output("--output", &report_path, args.overwrite)?;
    let prompts = read_prompt_lines(&args.prompts)?;
    let device = args.inception.device.open()?;
    let model = BaseSpec {
        base: &args.base,
        base_config: args.base_config.clone(),
        allow_pickle: args.allow_pickle,
        choices: BaseChoices {
            prediction: args.prediction_type,
            no_ema: args.no_ema,
        },
    }
    .open(|copy| {
        eprintln!(
            "reading the pickle --base through its safetensors copy {}",
            copy.display()
        )
    })?;
    eprintln!("base: {}", model.describe());
    let adapters = args
        .loras
        .iter()
        .map(|spec| spec.readable(args.allow_pickle))
        .collect::<Result<Vec<_>>>()?;
    let job = CompareJob {
        model: &model,
        adapters: &adapters,
        prompts: &prompts,
        generate: GenerateOptions {
            seed: args.seed,
            ..args.generation.options_for(&model)
        },
        seeds: args.seeds,
        dtype: args.precision.dtype(),
        reference: &args.reference,
        inception: &args.inception.inception,
        extract: ExtractOptions {
            batch_size: args.inception.batch_size,
            skip_bad: args.inception.skip_bad,
        },
        sampling: args.sampling.settings(),
        clip: args.clip.clip.as_deref(),
        output: &args.output,
    };
    let generating = prompts.len() * (adapters.len() + 1);
    let bar = ProgressBar::new(generating as u64);
    bar.set_style(
        ProgressStyle::with_template("{msg:40} {pos}/{len} {bar:30} {elapsed}")
            .expect("valid template"),
    );
    let mut started = 0;
    let report = compare(&job, &device, &mut |event| match event {
        CompareEvent::Generating { column, prompt } => {
            bar.set_message(format!("generating: {column}, prompt {}", prompt + 1));
            bar.set_position(started);
            started += 1;
        }
        CompareEvent::Scoring { set, phase } => match phase {
            Phase::Start(n) => {
                bar.set_message(format!("scoring: {set}"));
                bar.set_length(n as u64);
                bar.set_position(0);
            }
            Phase::Done(done) => bar.set_position(done as u64),
        },
    })?;
    bar.finish_and_clear();
    lora_core::io::write_atomic(&report_path, |temp| {
        Ok(std::fs::write(
            temp,
            serde_json::to_string_pretty(&report)? + "\n",
        )?)
    })?;
    for column in &report.columns {
        let m = &column.metrics;
        let clip = m
            .clip_score
            .map_or(String::new(), |c| format!("  CLIP {c:.3}"));
        println!(
            "{:<24} FID {:>10.4}  IS {}  KID {}{clip}",
            column.column.name,
            m.scores.fid,
            m.scores.is_mean.map_or("-".into(), |v| format!("{v:.4}")),
            m.scores.kid_mean.map_or("-".into(), |v| format!("{v:.5}")),
        );
        for warning in &m.warnings {
            eprintln!("warning ({}): {warning}", column.column.name);
        }
    }
    println!("report: {}", report_path.display());
    println!("grid: {}", report.grid);
    for plot in &report.plots {
        println!("plot: {plot}");
    }
    Ok(())
}
