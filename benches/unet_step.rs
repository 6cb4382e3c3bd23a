//! UNet step benchmarks: one case per invocation, one JSON line per case on stdout.
//!
//!     cargo bench --bench unet_step -- <case> [--iters N] [--device cpu|cuda] [--dtype f32|f16|bf16]
//!                                             [--batch N] [--gradient-checkpointing]
//!                                             [--targets attn2|attn|attn-mlp]
//!
//! Cases (SD1.5 UNet architecture with random weights unless `tiny`; LoRA rank 4 on attn2):
//! - `train-sd15-32`, `train-sd15-64`: forward + backward + AdamW, batch 1, latents 32×32 / 64×64
//! - `infer-sd15-32`, `infer-sd15-64`: classifier-free-guidance step (batch 2), latents 32×32 /
//!   64×64, no gradients
//! - `train-sdxl-32`, `infer-sdxl-32`: the same on the SDXL base UNet architecture (random weights,
//!   `benches/sdxl_unet_config.json`), with its pooled embedding and size ids, latents 32×32;
//!   `train-sdxl-128`, `infer-sdxl-128` at SDXL's own 1024² (latents 128×128)
//! - `train-tiny`, `infer-tiny`: the same on the sd1-tiny fixture model (a quick check)
//!
//! `--device`, `--dtype` (of the frozen base; LoRA stays f32) and `--batch` override a case's
//! defaults (CPU, f32), for the GPU runs of `benches/gpu.sh`. `--targets` picks the adapted
//! layers as lora-train's preset of that name does (default attn2; `attn` is every attention
//! projection, the issue-19 "all-attention" case). `--gradient-checkpointing` trains
//! with `forward_checkpointed` (the reference: `enable_gradient_checkpointing()`). `--dora` makes
//! the adapter DoRA (the reference: peft's `use_dora=True`); `--algo loha|lokr` makes it LyCORIS'
//! LoHa / LoKr at the same rank and alpha (the reference: lycoris-lora's own modules).
//!
//! `benches/unet_step_reference.py` measures the same cases with diffusers + peft (PyTorch);
//! `benches/run_unet_step.sh` runs both side by side and prints the ratio.

mod common;

use common::{peak_rss_mib, time_runs, BenchArgs};
use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::Optimizer;
use lora_toolkit::core::adapters::{AdapterAlgorithm, Component};
use lora_toolkit::core::io::weights::{component_weights, RandomInit};
use lora_toolkit::core::models::config::UNetConfig;
use lora_toolkit::core::options::{DeviceSpec, Precision};
use lora_toolkit::core::{
    Adapter, AddedConditioning, LoraConfig, LoraTargets, Rng, UNet2DConditionModel,
};

struct Case {
    unet: UNet2DConditionModel,
    latent: usize,
    batch: usize,
    train: bool,
}

fn load_case(name: &str, device: &Device, dtype: DType) -> Result<Case> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let (unet, latent, batch, train) = match name {
        "train-sd15-32" | "train-sd15-64" | "infer-sd15-32" | "infer-sd15-64" => {
            let config = UNetConfig::from_file(&root.join("benches/sd15_unet_config.json"))?;
            // Frozen random weights: timing does not depend on the values, but they keep
            // activations finite so no denormal or NaN slow paths are measured.
            let vb = RandomInit::frozen(0).var_builder(device).set_dtype(dtype);
            let unet = UNet2DConditionModel::load(&config, &vb)?;
            match name {
                "train-sd15-32" => (unet, 32, 1, true),
                "train-sd15-64" => (unet, 64, 1, true),
                "infer-sd15-32" => (unet, 32, 2, false),
                _ => (unet, 64, 2, false),
            }
        }
        "train-sdxl-32" | "infer-sdxl-32" | "train-sdxl-128" | "infer-sdxl-128" => {
            let config = UNetConfig::from_file(&root.join("benches/sdxl_unet_config.json"))?;
            let vb = RandomInit::frozen(0).var_builder(device).set_dtype(dtype);
            let unet = UNet2DConditionModel::load(&config, &vb)?;
            match name {
                "train-sdxl-32" => (unet, 32, 1, true),
                "infer-sdxl-32" => (unet, 32, 2, false),
                "train-sdxl-128" => (unet, 128, 1, true),
                _ => (unet, 128, 2, false),
            }
        }
        "train-tiny" | "infer-tiny" => {
            let dir = root.join("tests/fixtures/sd1-tiny/unet");
            let config = UNetConfig::from_file(&dir.join("config.json"))?;
            let weights = component_weights(&dir, "diffusion_pytorch_model")?;
            let unet = UNet2DConditionModel::from_files(&config, &[weights], dtype, device)?;
            (
                unet,
                16,
                if name == "train-tiny" { 1 } else { 2 },
                name == "train-tiny",
            )
        }
        _ => bail!("unknown case `{name}`"),
    };
    Ok(Case {
        unet,
        latent,
        batch,
        train,
    })
}

/// The process's heap, counted: bytes live now and the most live since the last reset. On the
/// CPU the tensors are heap allocations, so these separate a step's activations and its backward
/// pass's working set from the weights exactly, where peak RSS also counts what the allocator
/// kept after a free. A half-precision base on the CPU takes the path CUDA takes (the engine's
/// non-kernel path), so its figures model a GPU's (benches/RESULTS.md compares them).
struct CountingAllocator;

static HEAP_LIVE: AtomicUsize = AtomicUsize::new(0);
static HEAP_PEAK: AtomicUsize = AtomicUsize::new(0);

fn count_allocation(ptr: *mut u8, bytes: usize) -> *mut u8 {
    if !ptr.is_null() {
        let live = HEAP_LIVE.fetch_add(bytes, Relaxed) + bytes;
        HEAP_PEAK.fetch_max(live, Relaxed);
    }
    ptr
}

// SAFETY: every call is passed to the system allocator unchanged; the counters only observe.
// `alloc_zeroed` and `realloc` are forwarded too: the trait's defaults would allocate, then zero
// or copy, where the binaries' system allocator skips clearing memory fresh from the kernel
// (calloc) and may grow a block in place (realloc).
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count_allocation(unsafe { System.alloc(layout) }, layout.size())
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count_allocation(unsafe { System.alloc_zeroed(layout) }, layout.size())
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let moved = unsafe { System.realloc(ptr, layout, new_size) };
        if !moved.is_null() {
            // Counted as a copy (the old and the new block live together for a moment), then
            // the old block freed: a peak never undercounts a moved block.
            count_allocation(moved, new_size);
            HEAP_LIVE.fetch_sub(layout.size(), Relaxed);
        }
        moved
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        HEAP_LIVE.fetch_sub(layout.size(), Relaxed);
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

fn heap_live() -> usize {
    HEAP_LIVE.load(Relaxed)
}

/// The most heap live since the last call (bytes), restarting the count from what is live now.
fn take_heap_peak() -> usize {
    HEAP_PEAK.swap(heap_live(), Relaxed)
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / 1048576.0
}

/// Device memory in use right now (MiB) on a CUDA device: after a synchronisation the stream-ordered
/// allocator has returned what was freed, so this is the live tensors plus the CUDA context.
fn gpu_used_mib(device: &Device) -> Option<f64> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = device {
        let (free, total) = dev.cuda_stream().context().mem_get_info().ok()?;
        return Some((total - free) as f64 / 1048576.0);
    }
    let _ = device;
    None
}

/// The default CUDA memory pool's peak bytes in use and reserved (MiB) since the last call, which
/// resets both: what the tensors needed at most, and what the stream-ordered allocator held for
/// them (the difference is fragmentation). `None` off CUDA.
fn pool_peaks_mib(device: &Device) -> Option<(f64, f64)> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = device {
        use candle_core::cuda_backend::cudarc::driver::sys;
        let ctx = dev.cuda_stream().context().clone();
        ctx.bind_to_thread().ok()?;
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        // SAFETY: plain driver queries on the context's device and its default pool.
        unsafe {
            sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device())
                .result()
                .ok()?;
            let peak = |attr| -> Option<f64> {
                let mut bytes: u64 = 0;
                let value = &mut bytes as *mut u64 as *mut std::ffi::c_void;
                sys::cuMemPoolGetAttribute(pool, attr, value)
                    .result()
                    .ok()?;
                let mut zero: u64 = 0;
                let reset = &mut zero as *mut u64 as *mut std::ffi::c_void;
                sys::cuMemPoolSetAttribute(pool, attr, reset)
                    .result()
                    .ok()?;
                Some(bytes as f64 / 1048576.0)
            };
            use sys::CUmemPool_attribute_enum::{
                CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH, CU_MEMPOOL_ATTR_USED_MEM_HIGH,
            };
            return Some((
                peak(CU_MEMPOOL_ATTR_USED_MEM_HIGH)?,
                peak(CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH)?,
            ));
        }
    }
    let _ = device;
    None
}

fn main() -> Result<()> {
    // SAFETY: first thing in `main`, before any other thread exists.
    unsafe { lora_toolkit::core::process_setup::configure() };
    let args = BenchArgs::from_env("usage: unet_step <case> [--iters N]")?;
    let case_name = args.case.clone();
    let iters = args.iters()?;
    let checkpointing = args.switch("--gradient-checkpointing");
    let dora = args.switch("--dora");
    let algo: AdapterAlgorithm = args
        .flag("--algo")?
        .map_or(Ok(AdapterAlgorithm::Lora), str::parse)?;
    let targets: LoraTargets = args
        .flag("--targets")?
        .map_or(Ok(LoraTargets::Attn2), str::parse)?;
    let device_spec: DeviceSpec = args
        .flag("--device")?
        .map_or(Ok(DeviceSpec::Cpu), str::parse)?;
    let device = device_spec.open()?;
    let device_name = match device_spec {
        DeviceSpec::Cpu => format!("cpu, {} threads", candle_core::utils::get_num_threads()),
        cuda => cuda.to_string(),
    };
    let precision: Precision = args
        .flag("--dtype")?
        .map_or(Ok(Precision::F32), str::parse)?;
    let dtype = precision.dtype();
    let mut case = load_case(&case_name, &device, dtype)?;
    if let Some(batch) = args.flag("--batch")? {
        case.batch = batch.parse()?;
    }
    let cfg = case.unet.config().clone();
    let mut rng = Rng::new(1);
    let (b, s) = (case.batch, case.latent);
    let sample = rng
        .normal_tensor((b, cfg.in_channels, s, s), &device)?
        .to_dtype(dtype)?;
    let context = rng
        .normal_tensor((b, 77, cfg.cross_attention_dim), &device)?
        .to_dtype(dtype)?;
    let timesteps = Tensor::from_vec(vec![500f32; b], b, &device)?;
    let target = rng.normal_tensor((b, cfg.out_channels, s, s), &device)?;
    // SDXL: a pooled embedding (the input width less the six size ids' features) and fixed size
    // ids (a 256² image's whatever the latents: the values do not change the cost).
    let added = match cfg.text_time {
        Some(tt) => Some(AddedConditioning {
            text_embeds: rng
                .normal_tensor((b, tt.input_dim - 6 * tt.time_embed_dim), &device)?
                .to_dtype(dtype)?,
            time_ids: Tensor::new(&[256f32, 256.0, 0.0, 0.0, 256.0, 256.0], &device)?
                .unsqueeze(0)?
                .repeat((b, 1))?,
        }),
        None => None,
    };

    let lora = LoraConfig {
        rank: 4,
        alpha: 4.0,
        targets,
        lycoris: algo.lycoris(None),
        ..Default::default()
    };
    let mut trainable = Adapter::init_unet(&lora, case.unet.lora_modules(), &device, 0)?;
    if dora {
        trainable.add_dora(Component::Unet, &case.unet.adaptable_weights()?)?;
    }
    let mut modules = trainable.adapter.unet.clone();
    if !case.train {
        // Plain tensors at inference: attached `Var`s would make candle record the whole graph.
        for m in modules.values_mut() {
            *m = m.detached();
        }
    }
    case.unet.attach_adapter("bench", &modules, 1.0)?;
    let vars: Vec<_> = trainable.vars.iter().map(|(_, v)| v.clone()).collect();
    let mut opt = candle_nn::AdamW::new(
        vars.clone(),
        candle_nn::ParamsAdamW {
            lr: 1e-4,
            ..Default::default()
        },
    )?;

    // Training steps also time their forward pass alone: the rest is backward + AdamW.
    let mut forward_times = Vec::with_capacity(iters + 1);
    // The most device memory in use at the end of a training step's forward pass: the
    // activations its backward pass keeps (a CUDA GPU only).
    let mut used_after_forward: Option<f64> = None;
    // The most heap live at the end of a timed training step's forward pass.
    let heap_after_forward = std::cell::Cell::new(0);
    let mut step = || -> Result<()> {
        let t0 = Instant::now();
        if case.train {
            let (out, checkpointed) = if checkpointing {
                let (prediction, pass) = case.unet.forward_checkpointed_conditioned(
                    &sample,
                    &timesteps,
                    &context,
                    added.as_ref(),
                )?;
                (prediction, Some(pass))
            } else {
                let prediction =
                    case.unet
                        .forward_conditioned(&sample, &timesteps, &context, added.as_ref())?;
                (prediction, None)
            };
            // A GPU queues its work: wait for it, so each time is the work's, not its launch's.
            device.synchronize()?;
            forward_times.push(t0.elapsed().as_secs_f64());
            if let Some(used) = gpu_used_mib(&device) {
                used_after_forward = Some(used_after_forward.map_or(used, |u: f64| u.max(used)));
            }
            heap_after_forward.set(heap_after_forward.get().max(heap_live()));
            let loss = (out.to_dtype(DType::F32)? - &target)?.sqr()?.mean_all()?;
            drop(out);
            match checkpointed {
                Some(pass) => opt.step(&pass.backward(&loss, &vars)?)?,
                None => opt.backward_step(&loss)?,
            }
            device.synchronize()?;
        } else {
            // Reading a value back also waits for an asynchronous device to finish.
            let out =
                case.unet
                    .forward_conditioned(&sample, &timesteps, &context, added.as_ref())?;
            out.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?;
        }
        Ok(())
    };
    let used_before = gpu_used_mib(&device);
    step()?; // warm-up: first-touch allocations and lazily mapped weights
    pool_peaks_mib(&device); // the timed steps' peaks only
    let heap_before = heap_live(); // weights, kept adjoint kernels, optimizer state
    take_heap_peak();
    heap_after_forward.set(0);
    let (mean, min) = time_runs(iters, &mut step)?;
    let mut out = BTreeMap::new();
    out.insert("case", serde_json::json!(case_name));
    out.insert("impl", serde_json::json!("lora-toolkit (candle)"));
    out.insert("device", serde_json::json!(device_name));
    out.insert(
        "dtype",
        serde_json::json!(format!("{dtype:?}").to_lowercase()),
    );
    out.insert("batch", serde_json::json!(b));
    if checkpointing {
        out.insert("gradient_checkpointing", serde_json::json!(true));
    }
    if targets != LoraTargets::Attn2 {
        out.insert("targets", serde_json::json!(targets.name()));
    }
    if dora {
        out.insert("dora", serde_json::json!(true));
    }
    if algo != AdapterAlgorithm::Lora {
        out.insert("algo", serde_json::json!(algo.name()));
    }
    if let Some(used) = gpu_used_mib(&device) {
        // Not a peak (the key is what earlier results call it): the device's memory in use after
        // the run, which (the pool having released what was freed at the last synchronisation)
        // is the weights, the CUDA context and what is still alive; the peaks are `pool_peak_*`.
        out.insert("peak_gpu_mib", serde_json::json!(used));
    }
    out.insert("iters", serde_json::json!(iters));
    out.insert("mean_s", serde_json::json!(mean));
    out.insert("min_s", serde_json::json!(min));
    if case.train {
        // The warm-up step's forward pass is left out, as in the timed steps.
        let timed = &forward_times[1..];
        let forward = timed.iter().sum::<f64>() / timed.len() as f64;
        out.insert("forward_mean_s", serde_json::json!(forward));
    }
    if let Some((used, reserved)) = pool_peaks_mib(&device) {
        out.insert("pool_peak_used_mib", serde_json::json!(used));
        out.insert("pool_peak_reserved_mib", serde_json::json!(reserved));
    }
    if let (Some(before), Some(after_forward)) = (used_before, used_after_forward) {
        // Weights, CUDA context; then what a forward pass leaves for the backward pass.
        out.insert("gpu_used_before_mib", serde_json::json!(before));
        out.insert(
            "gpu_used_after_forward_mib",
            serde_json::json!(after_forward),
        );
    }
    out.insert("peak_rss_mib", serde_json::json!(peak_rss_mib()));
    if device.is_cpu() {
        // What the timed steps hold beyond what was live before them (see `CountingAllocator`).
        out.insert(
            "heap_step_peak_mib",
            serde_json::json!(mib(take_heap_peak().saturating_sub(heap_before))),
        );
        if case.train {
            out.insert(
                "heap_after_forward_mib",
                serde_json::json!(mib(heap_after_forward.get().saturating_sub(heap_before))),
            );
        }
    }
    println!("{}", serde_json::to_string(&out)?);
    Ok(())
}
