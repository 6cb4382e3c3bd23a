//! Makes the embedded default model (`models/shapes-tiny`) from scratch: see
//! `lora_toolkit::default_model` for the recipe and the choices behind it.

use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use lora_toolkit::default_model::{build, Recipe};

/// Trains the default shapes model (every UNet weight, from random) and writes it as a
/// diffusers folder.
#[derive(Parser)]
struct Args {
    /// The model folder to create (must not exist)
    #[arg(long)]
    output: PathBuf,
    #[arg(long, default_value_t = Recipe::default().seed)]
    seed: u64,
    #[arg(long, default_value_t = Recipe::default().steps)]
    steps: usize,
    #[arg(long, default_value_t = Recipe::default().batch_size)]
    batch_size: usize,
    #[arg(long, default_value_t = Recipe::default().lr)]
    lr: f64,
    #[arg(long, default_value_t = Recipe::default().warmup_steps)]
    warmup_steps: usize,
}

fn main() -> Result<()> {
    // SAFETY: first thing in `main`, before any other thread exists.
    unsafe { lora_toolkit::core::process_setup::configure() };
    let args = Args::parse();
    let recipe = Recipe {
        seed: args.seed,
        steps: args.steps,
        batch_size: args.batch_size,
        lr: args.lr,
        warmup_steps: args.warmup_steps,
        ..Recipe::default()
    };
    let bar = ProgressBar::new(recipe.steps as u64).with_style(ProgressStyle::with_template(
        "{bar:40} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
    )?);
    let mut smoothed = None;
    let summary = build(&args.output, &recipe, &mut |step| {
        let s = smoothed.map_or(step.loss, |s: f64| 0.98 * s + 0.02 * step.loss);
        smoothed = Some(s);
        bar.set_position(step.step as u64);
        bar.set_message(format!("loss {s:.4} lr {:.2e}", step.lr));
        if step.step % 100 == 0 {
            let line = format!("step {}/{} loss(avg) {s:.4}", step.step, step.total);
            match bar.is_hidden() {
                true => eprintln!("{line}"),
                false => bar.println(line),
            }
        }
    })?;
    bar.finish();
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}
