//! Merge benchmark: a rank-32 attn-mlp adapter folded into an SD1.5-size random checkpoint
//! (fp16 diffusers folder: the real SD1.5 UNet tensor names and shapes, enumerated by building
//! lora-core's UNet from the SD1.5 config, plus a CLIP ViT-L/14 text encoder). Prints one JSON
//! line: wall time and peak RSS of the merge, measured in a child process that does nothing else.
//!
//!     cargo bench --bench merge [-- --keep DIR]
//!
//! With `--keep DIR` the inputs (DIR/base, DIR/adapter.safetensors) stay for
//! `benches/merge_reference.py DIR`, which does the same merge with plain PyTorch + safetensors.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use common::peak_rss_mib;
use lora_merge::lora_core::formats::adapter_file::{save_adapter, AdapterFormat, SaveOptions};
use lora_merge::lora_core::formats::keys::{modules_from_weights, Component};
use lora_merge::lora_core::formats::kohya::BaseModelVersion;
use lora_merge::lora_core::models::config::{PredictionType, UNetConfig};
use lora_merge::lora_core::options::AdapterSpec;
use lora_merge::lora_core::{Adapter, LoraModule, ModelModules, Rng, UNet2DConditionModel};
use lora_merge::stream::{write_streaming, PlannedTensor};
use lora_merge::{merge, MergeOptions};
use safetensors::Dtype;

const SD15_UNET_CONFIG: &str = r#"{
  "_class_name": "UNet2DConditionModel",
  "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
  "center_input_sample": false, "cross_attention_dim": 768,
  "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
  "downsample_padding": 1, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4,
  "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
  "out_channels": 4, "sample_size": 64,
  "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
}"#;
const RANK: usize = 32;
const CHILD_FLAG: &str = "--child-merge";

/// A `VarBuilder` backend that records every requested tensor's name and shape and hands out a
/// broadcast scalar, so enumerating the SD1.5 UNet allocates (almost) nothing.
#[derive(Default)]
struct Recorder {
    seen: Mutex<BTreeMap<String, Vec<usize>>>,
}

impl SimpleBackend for Recorder {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.seen
            .lock()
            .expect("not poisoned")
            .insert(name.to_string(), s.dims().to_vec());
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }
    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        Err(candle_core::Error::Msg(format!("no shape for `{name}`")))
    }
    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

fn sd15_unet_shapes() -> Result<BTreeMap<String, Vec<usize>>> {
    let config = UNetConfig::from_json(SD15_UNET_CONFIG)?;
    let recorder = std::sync::Arc::new(Recorder::default());
    struct Shared(std::sync::Arc<Recorder>);
    impl SimpleBackend for Shared {
        fn get(
            &self,
            s: Shape,
            n: &str,
            i: candle_nn::Init,
            d: DType,
            dev: &Device,
        ) -> candle_core::Result<Tensor> {
            self.0.get(s, n, i, d, dev)
        }
        fn get_unchecked(&self, n: &str, d: DType, dev: &Device) -> candle_core::Result<Tensor> {
            self.0.get_unchecked(n, d, dev)
        }
        fn contains_tensor(&self, n: &str) -> bool {
            self.0.contains_tensor(n)
        }
    }
    let vb = VarBuilder::from_backend(Box::new(Shared(recorder.clone())), DType::F16, Device::Cpu);
    UNet2DConditionModel::load(&config, &vb)?;
    let shapes = recorder.seen.lock().expect("not poisoned").clone();
    Ok(shapes)
}

/// CLIP ViT-L/14 text encoder (SD1.x) names and shapes.
fn clip_l_shapes() -> BTreeMap<String, Vec<usize>> {
    let (h, ff) = (768, 3072);
    let mut shapes = BTreeMap::from([
        (
            "text_model.embeddings.token_embedding.weight".to_string(),
            vec![49408, h],
        ),
        (
            "text_model.embeddings.position_embedding.weight".to_string(),
            vec![77, h],
        ),
        ("text_model.final_layer_norm.weight".to_string(), vec![h]),
        ("text_model.final_layer_norm.bias".to_string(), vec![h]),
    ]);
    for l in 0..12 {
        let p = format!("text_model.encoder.layers.{l}.");
        for (name, out, inp) in [
            ("self_attn.q_proj", h, h),
            ("self_attn.k_proj", h, h),
            ("self_attn.v_proj", h, h),
            ("self_attn.out_proj", h, h),
            ("mlp.fc1", ff, h),
            ("mlp.fc2", h, ff),
        ] {
            shapes.insert(format!("{p}{name}.weight"), vec![out, inp]);
            shapes.insert(format!("{p}{name}.bias"), vec![out]);
        }
        for norm in ["layer_norm1", "layer_norm2"] {
            shapes.insert(format!("{p}{norm}.weight"), vec![h]);
            shapes.insert(format!("{p}{norm}.bias"), vec![h]);
        }
    }
    shapes
}

/// Writes random fp16 tensors (U(-0.05, 0.05)) with the given names and shapes.
fn write_random_fp16(path: &Path, shapes: &BTreeMap<String, Vec<usize>>) -> Result<()> {
    std::fs::create_dir_all(path.parent().expect("a file in a folder"))?;
    let plan: Vec<PlannedTensor> = shapes
        .iter()
        .map(|(name, shape)| PlannedTensor {
            name: name.clone(),
            dtype: Dtype::F16,
            shape: shape.clone(),
        })
        .collect();
    write_streaming(path, &plan, &BTreeMap::new(), |i| {
        let n: usize = plan[i].shape.iter().product();
        let mut rng = Rng::new(i as u64 + 1);
        let values: Vec<f32> = (0..n)
            .map(|_| ((rng.uniform() - 0.5) * 0.1) as f32)
            .collect();
        let t = Tensor::from_vec(values, n, &Device::Cpu)?.to_dtype(DType::F16)?;
        Ok(safetensors::View::data(&t).into_owned())
    })
}

fn write_inputs(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let base = dir.join("base");
    let unet = base.join("unet/diffusion_pytorch_model.safetensors");
    write_random_fp16(&unet, &sd15_unet_shapes()?)?;
    std::fs::write(base.join("unet/config.json"), SD15_UNET_CONFIG)?;
    write_random_fp16(
        &base.join("text_encoder/model.safetensors"),
        &clip_l_shapes(),
    )?;

    let modules = modules_from_weights(Component::Unet, &[unet])?;
    let mut adapter = Adapter::default();
    let mut rng = Rng::new(7);
    for info in &modules {
        let mut matrix = |rows: usize, cols: usize| -> Result<Tensor> {
            let values: Vec<f32> = (0..rows * cols)
                .map(|_| ((rng.uniform() - 0.5) * 0.02) as f32)
                .collect();
            Ok(Tensor::from_vec(values, (rows, cols), &Device::Cpu)?)
        };
        let lora = LoraModule {
            down: matrix(RANK, info.in_features)?,
            up: matrix(info.out_features, RANK)?,
            alpha: RANK as f64,
            magnitude: None,
        };
        adapter.unet.insert(info.path.clone(), lora.into());
    }
    let adapter_path = dir.join("adapter.safetensors");
    let options = SaveOptions {
        format: AdapterFormat::Kohya,
        base_model: BaseModelVersion::SdV1,
        prediction: PredictionType::Epsilon,
        title: None,
        extra_metadata: BTreeMap::new(),
        lokr_factor: None,
    };
    save_adapter(
        &adapter_path,
        &adapter,
        &ModelModules::unet_only(&modules),
        &options,
    )?;
    Ok((base, adapter_path))
}

fn dir_size(path: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(path)? {
        let entry = entry?;
        total += if entry.file_type()?.is_dir() {
            dir_size(&entry.path())?
        } else {
            entry.metadata()?.len()
        };
    }
    Ok(total)
}

/// The child: merge and report; nothing else runs in this process.
fn child(base: &str, adapter: &str, output: &str) -> Result<()> {
    let start = Instant::now();
    let report = merge(&MergeOptions {
        base: base.into(),
        adapters: vec![AdapterSpec {
            path: adapter.into(),
            scale: 1.0,
        }],
        output: output.into(),
        dtype: None,
        allow_unmatched: false,
        allow_nonfinite: false,
    })?;
    let seconds = start.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({"seconds": seconds, "peak_rss_mib": peak_rss_mib(), "tensors_changed": report.tensors_changed})
    );
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == CHILD_FLAG) {
        // The process settings `lora-merge`'s own `main` makes (allocator, threads).
        // SAFETY: first thing in this process, before any other thread exists.
        unsafe { lora_merge::lora_core::process_setup::configure() };
        return child(&args[i + 1], &args[i + 2], &args[i + 3]);
    }
    let keep = args
        .iter()
        .position(|a| a == "--keep")
        .map(|i| PathBuf::from(&args[i + 1]));
    let temp = tempfile::tempdir()?;
    let dir = keep.clone().unwrap_or_else(|| temp.path().to_path_buf());
    std::fs::create_dir_all(&dir)?;
    let (base, adapter) = write_inputs(&dir)?;
    let output = dir.join("merged");
    if output.exists() {
        std::fs::remove_dir_all(&output)?;
    }
    let run = std::process::Command::new(std::env::current_exe()?)
        .args([
            CHILD_FLAG,
            &base.display().to_string(),
            &adapter.display().to_string(),
            &output.display().to_string(),
        ])
        .output()?;
    if !run.status.success() {
        bail!("merge failed: {}", String::from_utf8_lossy(&run.stderr));
    }
    let measured: serde_json::Value = serde_json::from_slice(&run.stdout)?;
    let result = serde_json::json!({
        "bench": "merge-sd15-fp16-rank32-attn-mlp",
        "impl": "lora-merge",
        "threads": std::thread::available_parallelism()?.get(),
        "checkpoint_mib": dir_size(&base)? as f64 / (1 << 20) as f64,
        "adapter_mib": std::fs::metadata(&adapter)?.len() as f64 / (1 << 20) as f64,
        "seconds": measured["seconds"],
        "peak_rss_mib": measured["peak_rss_mib"],
        "tensors_changed": measured["tensors_changed"],
    });
    println!("{result}");
    if keep.is_none() {
        drop(temp);
    }
    Ok(())
}
