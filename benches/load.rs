//! Model load benchmark: an SD 1.5 UNet read from an fp16 diffusers folder into f32 on the CPU,
//! the first thing every `lora-infer` and `lora-train` run does. Prints one JSON line: the load's
//! wall time and the process's peak RSS.
//!
//!     cargo bench --bench merge -- --keep DIR    # writes DIR/base, an SD 1.5-size fp16 folder
//!     cargo bench --bench load -- DIR/base/unet
//!
//! `benches/load_reference.py DIR/base/unet` loads the same folder with diffusers'
//! `UNet2DConditionModel.from_pretrained(…, torch_dtype=torch.float32)`.

mod common;

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use common::{peak_rss_mib, BenchArgs};
use lora_toolkit::core::io::weights::component_weights;
use lora_toolkit::core::models::config::UNetConfig;
use lora_toolkit::core::UNet2DConditionModel;

fn main() -> Result<()> {
    // The process settings the commands make (allocator, threads).
    // SAFETY: first thing in this process, before any other thread exists.
    unsafe { lora_toolkit::core::process_setup::configure() };
    let args = BenchArgs::from_env("usage: cargo bench --bench load -- <diffusers unet folder>")?;
    let dir = Path::new(&args.case);
    let config = UNetConfig::from_file(&dir.join("config.json"))
        .with_context(|| format!("{} holds no UNet config", dir.display()))?;
    let weights = component_weights(dir, "diffusion_pytorch_model")?;
    let start = Instant::now();
    let unet = UNet2DConditionModel::from_files(&config, &[weights], DType::F32, &Device::Cpu)?;
    let seconds = start.elapsed().as_secs_f64();
    drop(unet);
    println!(
        "{}",
        serde_json::json!({
            "bench": "load-sd15-unet-fp16-to-f32",
            "impl": "lora-toolkit (candle)",
            "threads": std::thread::available_parallelism()?.get(),
            "seconds": seconds,
            "peak_rss_mib": peak_rss_mib(),
        })
    );
    Ok(())
}
