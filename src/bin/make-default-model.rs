//! Makes the embedded default model (`models/shapes-tiny`) from scratch: see
//! `lora_toolkit::default_model` for the recipe and the choices behind it.

use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use lora_toolkit::core::options::DeviceSpec;
use lora_toolkit::default_model::{build, measure_following, Recipe};

/// Trains the default shapes model (every UNet weight, from random) and writes it as a
/// diffusers folder; or, with `--measure`, reports how an existing one follows its captions.
#[derive(Parser)]
struct Args {
    /// The model folder to create (must not exist)
    #[arg(long, required_unless_present = "measure")]
    output: Option<PathBuf>,
    /// Only measure how the model in this folder follows the shapes captions (JSON on stdout)
    #[arg(long, conflicts_with = "output")]
    measure: Option<PathBuf>,
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
    /// The UNet's channels at its three resolution levels
    #[arg(long, value_delimiter = ',', default_values_t = Recipe::default().block_out_channels)]
    channels: Vec<usize>,
    #[arg(long, default_value_t = Recipe::default().layers_per_block)]
    layers_per_block: usize,
    /// Decay of the weight average saved as the model (0: save the last step's weights)
    #[arg(long, default_value_t = Recipe::default().ema_decay)]
    ema_decay: f64,
    /// How far the training shapes may lie from the centre, per axis, in fractions of the side
    #[arg(long, default_value_t = Recipe::default().position_spread)]
    position_spread: f32,
    /// Pictures per caption for the prompt-following measure written to recipe.json (0: none)
    #[arg(long, default_value_t = 4)]
    following_seeds: usize,
    /// Where to train: auto, cpu, cuda or cuda:N
    #[arg(long, default_value_t = DeviceSpec::Auto)]
    device: DeviceSpec,
}

fn main() -> Result<()> {
    // SAFETY: first thing in `main`, before any other thread exists.
    unsafe { lora_toolkit::core::process_setup::configure() };
    let args = Args::parse();
    let &[c0, c1, c2] = args.channels.as_slice() else {
        anyhow::bail!(
            "--channels takes three numbers (one per resolution level), e.g. 16,32,64; got {:?}",
            args.channels
        );
    };
    let recipe = Recipe {
        seed: args.seed,
        steps: args.steps,
        batch_size: args.batch_size,
        lr: args.lr,
        warmup_steps: args.warmup_steps,
        block_out_channels: [c0, c1, c2],
        layers_per_block: args.layers_per_block,
        ema_decay: args.ema_decay,
        position_spread: args.position_spread,
        ..Recipe::default()
    };
    if let Some(note) = args.device.auto_note() {
        eprintln!("{note}");
    }
    let device = args.device.open()?;
    if let Some(dir) = &args.measure {
        anyhow::ensure!(
            args.following_seeds > 0,
            "--measure needs --following-seeds of at least 1"
        );
        let following = measure_following(dir, &device, args.following_seeds, args.seed)?;
        println!("{}", serde_json::to_string_pretty(&following)?);
        return Ok(());
    }
    let output = args
        .output
        .expect("clap requires --output without --measure");
    let bar = ProgressBar::new(recipe.steps as u64).with_style(ProgressStyle::with_template(
        "{bar:40} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
    )?);
    let mut smoothed = None;
    let summary = build(
        &output,
        &recipe,
        &device,
        args.following_seeds,
        &mut |step| {
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
        },
    )?;
    bar.finish();
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}
