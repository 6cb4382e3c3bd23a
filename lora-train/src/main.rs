//! `lora-train`: a thin command-line front end over the `lora_train` library.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use cli::{Cli, Command};
use indicatif::{ProgressBar, ProgressStyle};
use lora_train::{Preparation, Stopped, TrainArgs, Trainer};

mod cli;
mod data_commands;

fn main() -> Result<()> {
    // SAFETY: first thing in `main`, before any other thread exists.
    unsafe { lora_core::process_setup::configure() };
    let cli = Cli::parse();
    if let Some(Command::Data(command)) = cli.command {
        std::process::exit(data_commands::run(command));
    }
    let args = match &cli.config {
        Some(path) => TrainArgs::from_toml_file(path)?.overlay(cli.args),
        None => cli.args,
    };
    let device_note = args.device.unwrap_or_default().auto_note();
    let config = args.resolve()?;
    if let Some(note) = device_note {
        eprintln!("{note}");
    }

    let encoding = ProgressBar::hidden();
    let mut trainer = Trainer::new(config, &mut |event| match event {
        Preparation::Dataset(d) => {
            for w in &d.warnings {
                eprintln!("warning: {w}");
            }
            for bad in &d.skipped {
                eprintln!("skipped: {bad}");
            }
            eprintln!(
                "dataset: {} images, {} samples per epoch{}",
                d.items.len(),
                d.samples_per_epoch(),
                if d.skipped.is_empty() {
                    String::new()
                } else {
                    format!(", {} bad files skipped", d.skipped.len())
                }
            );
        }
        Preparation::ClassImages(d) => {
            for w in &d.warnings {
                eprintln!("warning (class images): {w}");
            }
            eprintln!(
                "class images (prior preservation): {} images, {} samples per pass",
                d.items.len(),
                d.samples_per_epoch()
            );
        }
        Preparation::Encoding { done, total } => {
            if done == 1 {
                encoding.set_draw_target(indicatif::ProgressDrawTarget::stderr());
                encoding.set_length(total as u64);
                encoding.set_style(
                    ProgressStyle::with_template("encoding {pos}/{len} images {bar:30}")
                        .expect("valid template"),
                );
            }
            encoding.set_position(done as u64);
            if done == total {
                encoding.finish_and_clear();
            }
        }
        Preparation::Resumed { step, path } => {
            eprintln!("resuming at step {step} from {}", path.display());
        }
        Preparation::Base(model) => eprintln!("base: {}", model.describe()),
        Preparation::PickleCopy(copy) => {
            eprintln!(
                "reading the pickle --base through its safetensors copy {}",
                copy.display()
            );
        }
    })?;
    let adapter = trainer.adapter();
    let values: usize = trainer.params().iter().map(|(_, v)| v.elem_count()).sum();
    eprintln!(
        "adapter: {} UNet modules{}, {values} trained values; optimizer state {:.1} MiB",
        adapter.unet.len(),
        match (adapter.text_encoder.len(), adapter.text_encoder_2.len()) {
            (0, _) => String::new(),
            (n, 0) => format!(" and {n} text-encoder modules (captions encoded every step)"),
            (n, m) => format!(
                " and {n} + {m} modules in the two text encoders (captions encoded every step)"
            ),
        },
        trainer.optimizer_state_bytes() as f64 / (1 << 20) as f64
    );

    // SIGINT / SIGTERM: finish the step in progress, write a checkpoint, say how to resume.
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst))
        .context("cannot install the SIGINT/SIGTERM handler")?;
    trainer.stop_on(stop);

    let bar = ProgressBar::new(trainer.total_steps() as u64);
    bar.set_position(trainer.current_step() as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps  loss {msg}  {per_sec}  ETA {eta}",
        )
        .expect("valid template"),
    );
    bar.enable_steady_tick(Duration::from_millis(500));
    let result = trainer.run(&mut |report| {
        bar.set_message(format!("{:.4}", report.loss));
        bar.set_position(report.step as u64);
    });
    bar.finish_and_clear();
    let summary = match result {
        Err(e) if e.is::<Stopped>() => {
            eprintln!("{e}");
            // The shell's convention for a run ended by a signal (128 + SIGINT).
            std::process::exit(130);
        }
        other => other?,
    };
    eprintln!(
        "trained {} steps (to step {}): mean step {:.3} s, {:.2} images/s, loss {} → {}{}",
        summary.steps_run,
        summary.final_step,
        summary.mean_step_seconds,
        summary.images_per_second,
        summary
            .first_loss
            .map_or("-".to_string(), |l| format!("{l:.4}")),
        summary
            .last_loss
            .map_or("-".to_string(), |l| format!("{l:.4}")),
        summary.peak_rss_bytes.map_or(String::new(), |b| format!(
            ", peak memory (RSS) {:.0} MiB",
            b as f64 / (1 << 20) as f64
        )),
    );
    if let (Some(first), Some(last)) = (summary.first_val_loss, summary.last_val_loss) {
        eprintln!("validation loss {first:.4} → {last:.4} (metrics file: val_loss rows)");
    }
    eprintln!("adapter written to {}", summary.output.display());
    if let Some(ema) = &summary.ema_output {
        eprintln!(
            "its moving average (--ema-decay) written to {}",
            ema.display()
        );
    }
    Ok(())
}
