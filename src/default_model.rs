//! The embedded default model, `models/shapes-tiny`: a Stable Diffusion 1.x pipeline in the
//! diffusers layout, small enough to commit, so the quick start and the end-to-end test run on a
//! fresh offline machine. This module is its recipe: [`build`] initialises it and trains every
//! UNet weight from scratch (a full fine-tune) on [`crate::shapes`] pictures; rerunning the
//! recipe with the same [`Recipe`] on the same machine reproduces the committed weights.
//!
//! Choices, and why:
//! - **Pixel space, no VAE.** A VAE worth the name is larger than the whole budget and would
//!   itself need training; at 32×32 pixels the UNet can denoise RGB directly (a folder without
//!   `vae/` means exactly that to lora-train and lora-infer).
//! - **Frozen random text encoder.** CLIP's job here is only to give each caption word a distinct
//!   embedding; a seeded random CLIP does that, and the UNet's cross-attention learns to read it.
//!   It uses the embedded OpenAI vocabulary (no `tokenizer/`), as SD1 does, so `sks` is the same
//!   rare token people use.
//! - **Linear β schedule (DDPM's 1e-4 … 0.02), x₀ prediction.** SD's scaled-linear
//!   schedule is tuned for latents and leaves visible signal at the last timestep in pixel space.
//!   Predicting the clean picture (`prediction_type: sample`) rather than the noise puts the loss
//!   where the caption matters (at high noise the picture can only come from the caption), so the
//!   model learns to follow captions in minutes of CPU instead of hours; ε-prediction with the
//!   same budget learns to denoise but not to follow the caption (benches/RESULTS.md).
//! - **No clipping while sampling** (`clip_sample: false`). diffusers' DDIM clamps the predicted
//!   picture to [-1, 1] but derives the noise from the unclamped one; under classifier-free
//!   guidance the prediction overshoots (a white background guided to 3), and the noise then
//!   carries the overshoot with the opposite sign, so guided pictures flip white backgrounds to
//!   black and smear colours. Unclamped, the step stays consistent and the image's final
//!   conversion clamps the overshoot away.
//! - **The weights' moving average is the model** (decay 0.999, lora-train's `Ema`, which warms
//!   up as diffusers' `EMAModel` does), as in DDPM and SD: it smooths out the noise of the last
//!   steps' updates, which the raw weights carry.
//! - **Centred shapes** ([`shapes::POSITION_SPREAD`] 0; sizes still vary). With shapes anywhere in
//!   the picture, the clean picture expected at high noise is the same soft disc whatever the
//!   shape word, so the loss hardly rewards reading it: the same training that taught every
//!   colour left shapes at chance. Centred, the expected picture at high noise is the asked
//!   shape itself, and the shape words are learned as fast as the colours (benches/RESULTS.md).
//! - **Sampled without guidance by default.** At guidance 1 the finished model follows colour,
//!   background and shape words best (numbers for every scale of [`FOLLOWING_GUIDANCE`] in
//!   `recipe.json`), and a picture costs one UNet pass per step instead of two.
//! - The committed weights were made on one thread (`RAYON_NUM_THREADS=1`): other thread counts
//!   may sum in another order and end a few ulps away.
//! - Weights are stored in f16 (half the bytes); every tool loads them into f32.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use lora_core::io::weights::RandomInit;
use lora_core::io::{write_atomic, write_safetensors_atomic};
use lora_core::models::config::{ClipTextConfig, SchedulerConfig, UNetConfig};
use lora_core::models::text_encoder::TextEncoder;
use lora_core::models::tokenizer::{ClipTokenizer, TokenizedPrompt};
use lora_core::source::ModelFolder;
use lora_core::{Rng, UNet2DConditionModel};
use lora_infer::Pipeline;
use lora_train::config::LrScheduler;
use lora_train::ema::Ema;
use lora_train::objective::denoising_loss;
use lora_train::optimizer::{clip_grad_norm, Optimizer, OptimizerSettings};
use lora_train::schedule::{learning_rate, NoiseSchedule};
use serde::Serialize;

use crate::following::Following;
use crate::shapes::{self, Scene, BACKGROUNDS, COLOURS};

/// Where the committed default model lives.
pub fn default_model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/shapes-tiny")
}

/// Steps between snapshots of the UNet weights in the unfinished model folder.
const SNAPSHOT_EVERY: usize = 250;

/// Picture side in pixels (the UNet's `sample_size`).
pub const RESOLUTION: usize = 32;

/// The UNet's `config.json` for the widths and depth of `recipe`: SD 1.x's layout (a plain
/// first block, cross-attention in the lower two) at picture scale, in pixel space (3 channels).
fn unet_config(recipe: &Recipe) -> String {
    let config = serde_json::json!({
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": "0.42.1",
        "act_fn": "silu",
        // diffusers' SD 1.x name for the number of heads.
        "attention_head_dim": 4,
        "block_out_channels": recipe.block_out_channels,
        "center_input_sample": false,
        "cross_attention_dim": 32,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "downsample_padding": 1,
        "flip_sin_to_cos": true,
        "freq_shift": 0,
        "in_channels": 3,
        "layers_per_block": recipe.layers_per_block,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": 8,
        "out_channels": 3,
        "sample_size": RESOLUTION,
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "use_linear_projection": false
    });
    serde_json::to_string_pretty(&config).expect("a JSON value always serialises") + "\n"
}

const TEXT_ENCODER_CONFIG: &str = r#"{
  "architectures": ["CLIPTextModel"],
  "bos_token_id": 49406,
  "eos_token_id": 49407,
  "hidden_act": "quick_gelu",
  "hidden_size": 32,
  "intermediate_size": 64,
  "layer_norm_eps": 1e-05,
  "max_position_embeddings": 77,
  "model_type": "clip_text_model",
  "num_attention_heads": 2,
  "num_hidden_layers": 2,
  "pad_token_id": 49407,
  "projection_dim": 32,
  "vocab_size": 49408
}
"#;

const SCHEDULER_CONFIG: &str = r#"{
  "_class_name": "DDIMScheduler",
  "_diffusers_version": "0.42.1",
  "beta_end": 0.02,
  "beta_schedule": "linear",
  "beta_start": 0.0001,
  "clip_sample": false,
  "num_train_timesteps": 1000,
  "prediction_type": "sample",
  "set_alpha_to_one": false,
  "steps_offset": 1,
  "timestep_spacing": "leading"
}
"#;

const MODEL_INDEX: &str = r#"{
  "_class_name": "StableDiffusionPipeline",
  "_diffusers_version": "0.42.1",
  "scheduler": ["diffusers", "DDIMScheduler"],
  "text_encoder": ["transformers", "CLIPTextModel"],
  "unet": ["diffusers", "UNet2DConditionModel"]
}
"#;

/// How the default model is made.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Recipe {
    pub seed: u64,
    pub steps: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub warmup_steps: usize,
    /// Share of samples trained with the empty caption, so classifier-free guidance has an
    /// unconditional prediction to push away from.
    pub caption_dropout: f64,
    /// The UNet's channels per resolution level (three levels, each a multiple of 8).
    pub block_out_channels: [usize; 3],
    pub layers_per_block: usize,
    /// Decay of the exponential moving average of the UNet weights that is saved instead of the
    /// last step's weights (exactly 0: save the last step's; otherwise strictly between 0 and 1).
    pub ema_decay: f64,
    /// How far a training picture's shape may lie from the centre ([`shapes::POSITION_SPREAD`]).
    pub position_spread: f32,
}

impl Default for Recipe {
    fn default() -> Self {
        Self {
            seed: 0,
            steps: 4500,
            batch_size: 32,
            lr: 1e-3,
            warmup_steps: 200,
            caption_dropout: 0.1,
            block_out_channels: [16, 32, 64],
            layers_per_block: 1,
            ema_decay: 0.999,
            position_spread: shapes::POSITION_SPREAD,
        }
    }
}

/// One training step of the recipe, for progress display.
pub struct RecipeStep {
    pub step: usize,
    pub total: usize,
    pub loss: f64,
    pub lr: f64,
}

/// Writes `tensors` as an f16 safetensors file.
fn save_f16<'a>(
    path: &Path,
    tensors: impl IntoIterator<Item = (&'a String, &'a Tensor)>,
) -> Result<()> {
    let tensors = tensors
        .into_iter()
        .map(|(name, tensor)| Ok((name.clone(), tensor.to_dtype(DType::F16)?)))
        .collect::<Result<Vec<_>>>()?;
    write_safetensors_atomic(path, &tensors, BTreeMap::new())
}

fn write_text(path: &Path, text: &str) -> Result<()> {
    write_atomic(path, |temp| {
        std::fs::write(temp, text).with_context(|| format!("cannot write {}", temp.display()))
    })
}

/// The last hidden states `[n, 77, hidden]` of `prompts`.
pub fn encode_prompts(
    tokenizer: &ClipTokenizer,
    text_encoder: &TextEncoder,
    prompts: &[String],
    device: &Device,
) -> Result<Tensor> {
    let tokens: Vec<TokenizedPrompt> = prompts.iter().map(|p| tokenizer.encode(p)).collect();
    text_encoder.forward(&TokenizedPrompt::batch_tensor(&tokens, device)?)
}

/// What [`build`] reports.
#[derive(Debug, Clone, Serialize)]
pub struct RecipeSummary {
    pub recipe: Recipe,
    pub unet_parameters: usize,
    pub first_loss: f64,
    /// Mean loss over the last 100 steps.
    pub final_loss: f64,
    pub seconds: f64,
    /// How well the finished model follows its captions ([`crate::following`]) at each of
    /// [`FOLLOWING_GUIDANCE`], over `following_seeds` pictures of every caption (none when 0).
    pub following: BTreeMap<String, Following>,
}

/// Guidance scales at which [`build`] measures the finished model.
pub const FOLLOWING_GUIDANCE: [f64; 5] = [1.0, 1.5, 2.0, 5.0, 7.5];
/// Sampling steps of that measure.
pub const FOLLOWING_STEPS: usize = 25;

/// How the model in `dir` follows the shapes captions at each of [`FOLLOWING_GUIDANCE`], over
/// `seeds` pictures of every caption from seeds `seed…` (nothing when `seeds` is 0).
pub fn measure_following(
    dir: &Path,
    device: &Device,
    seeds: usize,
    seed: u64,
) -> Result<BTreeMap<String, Following>> {
    let mut following = BTreeMap::new();
    if seeds == 0 {
        return Ok(following);
    }
    let model = ModelFolder::open(dir)?;
    let pipeline = Pipeline::load(&model, &[], device, DType::F32, false)?;
    for guidance in FOLLOWING_GUIDANCE {
        let measured =
            crate::following::measure(&pipeline, guidance, FOLLOWING_STEPS, seeds, seed)?;
        following.insert(guidance.to_string(), measured);
    }
    Ok(following)
}

/// Makes the default model in `output` (which must not exist) on `device`: writes the configs
/// and the random text encoder, trains the UNet per `recipe`, writes its weights and
/// `recipe.json`; the folder is assembled under a temporary name and renamed into place when
/// complete. Then measures how the finished model follows its captions (`following_seeds`
/// pictures per caption) and adds that to `recipe.json`.
pub fn build(
    output: &Path,
    recipe: &Recipe,
    device: &Device,
    following_seeds: usize,
    on_step: &mut dyn FnMut(&RecipeStep),
) -> Result<RecipeSummary> {
    ensure!(
        !output.exists(),
        "{} already exists; the model is written to a new folder",
        output.display()
    );
    ensure!(
        recipe.steps > recipe.warmup_steps && recipe.batch_size > 0,
        "the recipe needs more steps than warm-up steps and a positive batch size"
    );
    ensure!(
        recipe
            .block_out_channels
            .iter()
            .all(|&c| c > 0 && c % 8 == 0)
            && recipe.layers_per_block > 0,
        "the UNet needs channels that are positive multiples of 8 (its group norm has 8 groups) \
         and at least one layer per block, not {:?} × {}",
        recipe.block_out_channels,
        recipe.layers_per_block
    );
    ensure!(
        recipe.position_spread >= 0.0,
        "the position spread is a distance from the centre (0: centred; 0.5 or more: anywhere), \
         not {}",
        recipe.position_spread
    );
    let partial = output.with_extension("partial");
    if partial.exists() {
        std::fs::remove_dir_all(&partial)
            .with_context(|| format!("cannot clear {}", partial.display()))?;
    }
    for dir in ["unet", "text_encoder", "scheduler"] {
        std::fs::create_dir_all(partial.join(dir))
            .with_context(|| format!("cannot create {}", partial.join(dir).display()))?;
    }
    write_text(&partial.join("model_index.json"), MODEL_INDEX)?;
    let unet_config_json = unet_config(recipe);
    write_text(&partial.join("unet/config.json"), &unet_config_json)?;
    write_text(
        &partial.join("text_encoder/config.json"),
        TEXT_ENCODER_CONFIG,
    )?;
    write_text(
        &partial.join("scheduler/scheduler_config.json"),
        SCHEDULER_CONFIG,
    )?;

    // The text encoder: random, frozen, saved as f16 and used from the saved file so training
    // sees exactly the embeddings users will get.
    let te_config = ClipTextConfig::parse(TEXT_ENCODER_CONFIG)?;
    // `from_var_builder` asks for every tensor by its full `text_model.…` name.
    let te_init = RandomInit::trainable(recipe.seed.wrapping_add(1));
    TextEncoder::from_var_builder(te_init.var_builder(device), &te_config)?;
    let te_vars = te_init.vars();
    // A random CLIP mixes tokens so evenly that captions differing in one word get embeddings
    // with cosine ≈ 0.9 at that word; unit-variance token embeddings (50× CLIP's 0.02) keep each
    // word its own direction (cosine ≈ 0 between words), which the UNet learns to read quickly.
    for (name, var) in &te_vars {
        if name.ends_with("token_embedding.weight") {
            var.set(&(var.as_tensor() * 50.0)?)?;
        }
    }
    save_f16(
        &partial.join("text_encoder/model.safetensors"),
        te_vars.iter().map(|(n, v)| (n, v.as_tensor())),
    )?;

    let tokenizer = ClipTokenizer::load(None, &te_config)?;
    let text_encoder = TextEncoder::load(
        &partial.join("text_encoder"),
        &te_config,
        DType::F32,
        device,
        BTreeMap::new(),
    )?;
    let captions = shapes::all_captions();
    let embeddings = encode_prompts(&tokenizer, &text_encoder, &captions, device)?;
    let empty = encode_prompts(&tokenizer, &text_encoder, &[String::new()], device)?;
    let caption_index: BTreeMap<String, usize> = captions
        .iter()
        .enumerate()
        .map(|(i, c)| (c.clone(), i))
        .collect();

    let unet_config = UNetConfig::from_json(&unet_config_json)?;
    let unet_init = RandomInit::trainable(recipe.seed);
    let unet = UNet2DConditionModel::load(&unet_config, &unet_init.var_builder(device))?;
    let params = unet_init.vars();
    let unet_parameters = params.iter().map(|(_, v)| v.elem_count()).sum();
    let mut average = (recipe.ema_decay != 0.0)
        .then(|| Ema::new(recipe.ema_decay, &params))
        .transpose()?;
    let mut optimizer = Optimizer::new(params, &OptimizerSettings::default())?;
    // Writes the UNet weights into the folder: the average where the recipe keeps one, else the
    // last step's.
    let unet_path = partial.join("unet/diffusion_pytorch_model.safetensors");
    let save_unet = |optimizer: &Optimizer, average: &Option<Ema>| {
        let params = optimizer.params().iter().enumerate();
        save_f16(
            &unet_path,
            params.map(|(i, (name, var))| match average {
                Some(average) => (name, &average.tensors()[i]),
                None => (name, var.as_tensor()),
            }),
        )
    };
    let schedule = NoiseSchedule::new(&SchedulerConfig::parse(SCHEDULER_CONFIG)?);

    let mut rng = Rng::new(recipe.seed.wrapping_add(2));
    let start = Instant::now();
    let mut first_loss = None;
    let mut recent = Vec::new();
    for step in 0..recipe.steps {
        let mut pixels = Vec::with_capacity(recipe.batch_size);
        let mut contexts = Vec::with_capacity(recipe.batch_size);
        for _ in 0..recipe.batch_size {
            let scene = Scene::random(&mut rng, &COLOURS, &BACKGROUNDS, recipe.position_spread);
            // Drawn on the CPU and moved to the device once per batch.
            pixels.push(shapes::image_tensor(
                &scene.render(RESOLUTION),
                &Device::Cpu,
            )?);
            let context = if rng.uniform() < recipe.caption_dropout {
                empty.get(0)?
            } else {
                embeddings.get(caption_index[&scene.caption()])?
            };
            contexts.push(context);
        }
        let x = Tensor::stack(&pixels, 0)?.to_device(device)?;
        let context = Tensor::stack(&contexts, 0)?;
        let loss = denoising_loss(&unet, &schedule, None, 0.0, &x, &context, None, &mut rng)?;
        let value = f64::from(loss.to_scalar::<f32>()?);
        ensure!(
            value.is_finite(),
            "the loss became {value} at step {}",
            step + 1
        );
        let grads = loss.backward()?;
        let grads = optimizer
            .params()
            .iter()
            .map(|(name, var)| {
                grads
                    .get(var.as_tensor())
                    .cloned()
                    .with_context(|| format!("no gradient reached `{name}`"))
            })
            .collect::<Result<Vec<_>>>()?;
        let (_, grads) = clip_grad_norm(grads, 1.0)?;
        let grads: Vec<Option<Tensor>> = grads.into_iter().map(Some).collect();
        let lr = learning_rate(
            LrScheduler::Cosine,
            recipe.lr,
            recipe.warmup_steps,
            step,
            recipe.steps,
        );
        optimizer.step(&grads, lr)?;
        if let Some(average) = &mut average {
            average.update(optimizer.params(), step as u64 + 1)?;
        }
        if (step + 1) % SNAPSHOT_EVERY == 0 {
            // The unfinished folder is a loadable model, to look at a long run before it ends.
            save_unet(&optimizer, &average)?;
        }
        first_loss.get_or_insert(value);
        recent.push(value);
        if recent.len() > 100 {
            recent.remove(0);
        }
        on_step(&RecipeStep {
            step: step + 1,
            total: recipe.steps,
            loss: value,
            lr,
        });
    }
    save_unet(&optimizer, &average)?;
    let mut summary = RecipeSummary {
        recipe: recipe.clone(),
        unet_parameters,
        first_loss: first_loss.unwrap_or(f64::NAN),
        final_loss: recent.iter().sum::<f64>() / recent.len().max(1) as f64,
        seconds: start.elapsed().as_secs_f64(),
        following: BTreeMap::new(),
    };
    let write_summary = |dir: &Path, summary: &RecipeSummary| {
        write_text(
            &dir.join("recipe.json"),
            &(serde_json::to_string_pretty(summary)? + "\n"),
        )
    };
    write_summary(&partial, &summary)?;
    std::fs::rename(&partial, output).with_context(|| {
        format!(
            "cannot move {} into place as {}",
            partial.display(),
            output.display()
        )
    })?;
    // Measured on the finished folder, so a measurement cut short leaves the model in place.
    summary.following = measure_following(output, device, following_seeds, recipe.seed)?;
    if following_seeds > 0 {
        write_summary(output, &summary)?;
    }
    Ok(summary)
}
