//! The quick start: trains a LoRA adapter for a new concept on the embedded default model and
//! writes before/after pictures and a loss curve (see `lora_toolkit::quickstart`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use lora_toolkit::quickstart::{run, Event, Options};

/// Train an adapter for the concept "sks" (a colour the default model never saw) and show what it
/// changed.
#[derive(Parser)]
struct Args {
    /// Base model folder [default: the embedded default model, models/shapes-tiny]
    #[arg(long)]
    base: Option<PathBuf>,
    /// Output folder (replaced if an earlier quick start made it)
    #[arg(long, default_value = "target/quickstart")]
    output: PathBuf,
    #[arg(long, default_value_t = Options::default().seed)]
    seed: u64,
    /// Adapter training steps
    #[arg(long, default_value_t = Options::default().train_steps)]
    steps: usize,
    /// Adapter learning rate
    #[arg(long, default_value_t = Options::default().lr)]
    lr: f64,
    /// Adapter rank
    #[arg(long, default_value_t = Options::default().rank)]
    rank: usize,
    /// Classifier-free guidance of the before/after pictures
    #[arg(long, default_value_t = Options::default().guidance)]
    guidance: f64,
}

fn main() -> Result<()> {
    // SAFETY: first thing in `main`, before any other thread exists.
    unsafe { lora_toolkit::core::process_setup::configure() };
    let args = Args::parse();
    let defaults = Options::default();
    let options = Options {
        base: args.base.unwrap_or(defaults.base.clone()),
        output: args.output,
        seed: args.seed,
        train_steps: args.steps,
        lr: args.lr,
        rank: args.rank,
        guidance: args.guidance,
        ..defaults
    };
    eprintln!(
        "quick start: training a LoRA adapter for `sks` on {}",
        options.base.display()
    );
    let bar = ProgressBar::new(options.train_steps as u64);
    bar.set_style(ProgressStyle::with_template(
        "{prefix:>9} {bar:30} {pos}/{len}  {msg}  [{elapsed}<{eta}]",
    )?);
    bar.set_prefix("training");
    bar.enable_steady_tick(Duration::from_millis(250));
    let report = run(&options, &mut |event| match event {
        Event::Training { report, total } => {
            bar.set_length(total as u64);
            bar.set_position(report.step as u64);
            bar.set_message(format!("loss {:.4}", report.loss));
        }
        Event::Sampling { done, total } => {
            if done == 0 {
                bar.set_prefix("sampling");
                bar.set_message("before/after pictures");
                bar.set_length(total as u64);
            }
            bar.set_position(done as u64);
        }
        Event::Following => {
            bar.set_prefix("checking");
            bar.set_message("how the base model follows its captions");
        }
    });
    bar.finish_and_clear();
    let report = report?;
    println!(
        "trained in {:.0} s (loss {:.4} -> {:.4}); {:.0} s in all",
        report.train_seconds,
        report.first_loss.unwrap_or(f64::NAN),
        report.last_loss.unwrap_or(f64::NAN),
        report.total_seconds
    );
    let f = &report.default_model_following;
    println!(
        "base model follows its captions (guidance {}, {} pictures): colour {:.0} %, background {:.0} %, shape {:.0} %",
        report.guidance,
        f.pictures,
        100.0 * f.colour,
        100.0 * f.background,
        100.0 * f.shape
    );
    println!("magenta score (concept colour), base -> with adapter (mean pixel change):");
    for p in &report.prompts {
        println!(
            "  {:<40} {:.3} -> {:.3}  ({:.1}/255)",
            p.prompt, p.base_concept_score, p.adapter_concept_score, p.mean_pixel_change
        );
    }
    println!("adapter:       {}", report.adapter.display());
    println!(
        "before/after:  {}  <- look here: the `sks` rows turn magenta on the right, the others stay",
        report.grid.display()
    );
    println!("loss curve:    {}", report.loss_curve.display());
    println!(
        "all figures:   {}",
        report.adapter.with_file_name("report.json").display()
    );
    Ok(())
}
