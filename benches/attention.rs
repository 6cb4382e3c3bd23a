//! Attention benchmarks: one case per invocation, one JSON line per case on stdout.
//!
//!     cargo bench --bench attention -- <case> [--iters N]
//!
//! Cases (an SD 1.5 UNet's attention layers at 64² latents, batch 1, 8 heads, CPU, f32):
//! - `self-4096`: 4096 queries and keys, heads of 40 (the first level's self-attention)
//! - `cross-4096`: 4096 queries against 77 keys (its cross-attention on the text)
//! - `self-1024`, `cross-1024`: the second level, heads of 80
//! - `self-256`: the third level, heads of 160
//!
//! and `self-9216`: an SD 2.1 UNet's first level at 96² latents (768² images), 9216 queries and
//! keys, 5 heads of 64.
//!
//! A run is the forward pass and the backward pass to queries, keys and values for an output
//! gradient of ones (candle's seed for a backward pass; the values do not change the work);
//! `forward_mean_s` reports the forward pass alone. `benches/attention_reference.py` measures
//! the same with PyTorch's `scaled_dot_product_attention`; `BENCH=attention
//! REFERENCE=benches/attention_reference.py benches/run_unet_step.sh python3 CASES…` runs both
//! side by side.

mod common;

use common::{print_cpu_report, time_runs, BenchArgs};
use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{Device, Var};
use lora_toolkit::core::engine::attention;
use lora_toolkit::core::Rng;

fn main() -> Result<()> {
    // SAFETY: first thing in `main`, before any other thread exists.
    unsafe { lora_toolkit::core::process_setup::configure() };
    let args = BenchArgs::from_env(
        "usage: attention <self-4096|cross-4096|self-1024|cross-1024|self-256|self-9216> [--iters N]",
    )?;
    let case = args.case.clone();
    let (queries, keys, heads, head_dim) = match case.as_str() {
        "self-4096" => (4096, 4096, 8, 40),
        "cross-4096" => (4096, 77, 8, 40),
        "self-1024" => (1024, 1024, 8, 80),
        "cross-1024" => (1024, 77, 8, 80),
        "self-256" => (256, 256, 8, 160),
        "self-9216" => (9216, 9216, 5, 64),
        _ => bail!("unknown case `{case}`"),
    };
    let iters = args.iters()?;
    let device = Device::Cpu;
    let mut rng = Rng::new(0);
    let mut var = |rows| -> Result<Var> {
        Ok(Var::from_tensor(
            &rng.normal_tensor((1, rows, heads * head_dim), &device)?,
        )?)
    };
    let (q, k, v) = (var(queries)?, var(keys)?, var(keys)?);
    let mut forward_s = Vec::new();
    let mut run = || -> Result<()> {
        let t0 = Instant::now();
        let out = attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), heads, false)?;
        forward_s.push(t0.elapsed().as_secs_f64());
        let grads = out.backward()?;
        for x in [&q, &k, &v] {
            grads.get(x).expect("every operand has a gradient");
        }
        Ok(())
    };
    run()?; // warm-up: first-touch allocations
    let (mean, min) = time_runs(iters, &mut run)?;
    let forward_mean = forward_s[1..].iter().sum::<f64>() / iters as f64;
    print_cpu_report(
        &case,
        iters,
        (mean, min),
        &[("forward_mean_s", serde_json::json!(forward_mean))],
    )
}
