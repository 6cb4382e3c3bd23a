//! VAE benchmarks: one case per invocation, one JSON line per case on stdout.
//!
//!     cargo bench --bench vae -- <case> [--iters N]
//!
//! Cases (the SD 1.5 VAE architecture, `block_out_channels` [128, 256, 512, 512], with frozen
//! random weights; CPU, f32, batch 1):
//! - `decode-32`: latents 1×4×32×32 to a 256² image
//! - `decode-64`: latents 1×4×64×64 to a 512² image (lora-infer's last step at 512²)
//! - `encode-256`, `encode-512`: an image to its latent mean (lora-train's caching pass over a
//!   dataset, per image)
//!
//! `benches/vae_reference.py` measures the same cases with diffusers' `AutoencoderKL`;
//! `BENCH=vae REFERENCE=benches/vae_reference.py benches/run_unet_step.sh python3 CASES…` runs
//! both side by side.

mod common;

use common::{print_cpu_report, time_runs, BenchArgs};

use anyhow::{bail, Result};
use candle_core::{DType, Device};
use lora_toolkit::core::io::weights::RandomInit;
use lora_toolkit::core::models::config::VaeConfig;
use lora_toolkit::core::models::vae::Vae;
use lora_toolkit::core::Rng;

/// The SD 1.5 VAE's `config.json` (diffusers), less what the loader does not read.
const SD15_VAE_CONFIG: &str = r#"{
  "_class_name": "AutoencoderKL",
  "act_fn": "silu",
  "block_out_channels": [128, 256, 512, 512],
  "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
  "in_channels": 3,
  "latent_channels": 4,
  "layers_per_block": 2,
  "norm_num_groups": 32,
  "out_channels": 3,
  "sample_size": 512,
  "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"]
}"#;

fn main() -> Result<()> {
    // SAFETY: first thing in `main`, before any other thread exists.
    unsafe { lora_toolkit::core::process_setup::configure() };
    let args =
        BenchArgs::from_env("usage: vae <decode-32|decode-64|encode-256|encode-512> [--iters N]")?;
    let case = args.case.clone();
    let (encode, size) = match case.as_str() {
        "decode-32" => (false, 32),
        "decode-64" => (false, 64),
        "encode-256" => (true, 256),
        "encode-512" => (true, 512),
        _ => bail!("unknown case `{case}`"),
    };
    let iters = args.iters()?;
    let device = Device::Cpu;
    let config = VaeConfig::parse(SD15_VAE_CONFIG)?;
    // Frozen random weights: timing does not depend on the values, but they keep activations
    // finite so no denormal or NaN slow paths are measured.
    let vb = RandomInit::frozen(0).var_builder(&device);
    let vae = Vae::from_var_builder(vb, config)?;
    let channels = if encode { 3 } else { 4 };
    let input = Rng::new(1).normal_tensor((1, channels, size, size), &device)?;
    let run = || -> Result<()> {
        let output = if encode {
            vae.encode_mean(&input)?
        } else {
            vae.decode(&input)?
        };
        output.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?;
        Ok(())
    };
    run()?; // warm-up: first-touch allocations
    let (mean, min) = time_runs(iters, run)?;
    print_cpu_report(&case, iters, (mean, min), &[])
}
