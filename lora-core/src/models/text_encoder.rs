//! The CLIP text encoder (transformers' `CLIPTextModel` and `CLIPTextModelWithProjection`):
//! prompt ids → the per-token hidden states the UNet cross-attends to (`last_hidden_state`, after
//! the final layer norm; SDXL reads the penultimate layer's, before it), and the pooled output
//! (the end token's final state, projected where the file has `text_projection`).
//!
//! Our own module rather than candle-transformers': its `models::clip::text_model` always uses
//! quick-GELU for text (SD 2.x needs exact GELU) and fixes the layer-norm epsilon, and
//! `stable_diffusion::clip::Config` has private fields, so only its SD presets can be built (no
//! custom or test configs), and its `Gelu` is the tanh approximation. The encoder layers are
//! [`crate::models::clip`]'s, shared with the vision tower; `ClipModel` uses this as its text tower.
//!
//! Adapters either fold into the weights at load (`deltas`, for generation) or attach unmerged
//! to the projections ([`TextEncoder::attach_adapter`], for training them): the layers are the
//! engine's, so the whole encoder is differentiable.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, VarBuilder};

use crate::adapters::{attach_checked, AdapterModules, ModuleInfo, ModuleKind};
use crate::engine::{LayerNormLayer, LinearLayer};
use crate::io::weights;
use crate::models::clip::encoder::{AttentionMask, ClipEncoder};
use crate::models::config::ClipTextConfig;

/// The component prefix of real checkpoints; transformers ≥ 5 saves `CLIPTextModel` without it.
const PREFIX: &str = "text_model.";
/// A tensor every layout has, used to tell the two apart.
const PROBE: &str = "embeddings.token_embedding.weight";
/// `CLIPTextModelWithProjection`'s projection of the pooled output, beside `text_model.`.
const PROJECTION: &str = "text_projection";
/// transformers' `CLIPTextConfig` default, for a config without `eos_token_id`.
const DEFAULT_EOS_TOKEN_ID: u32 = 49407;
/// The `eos_token_id` configs written before transformers corrected it carry (see
/// [`TextPooling::HighestId`]).
const LEGACY_EOS_TOKEN_ID: u32 = 2;

/// Which of a prompt's hidden states is its pooled output, as transformers' `CLIPTextModel`
/// chooses by the text config's `eos_token_id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextPooling {
    /// `eos_token_id == 2`, the stale value of older configs: the position of the highest id
    /// (the first, if repeated), which is the end token in CLIP's own vocabulary.
    HighestId,
    /// The first position holding this end-token id.
    FirstEndToken(u32),
}

impl TextPooling {
    fn of(config: &ClipTextConfig) -> Self {
        match config.eos_token_id {
            Some(LEGACY_EOS_TOKEN_ID) => Self::HighestId,
            Some(id) => Self::FirstEndToken(id),
            None => Self::FirstEndToken(DEFAULT_EOS_TOKEN_ID),
        }
    }
}

/// One pass of the encoder as SDXL reads it (transformers' `output_hidden_states=True`).
#[derive(Debug, Clone)]
pub struct TextEncoderStates {
    /// `hidden_states[-2]`: the penultimate layer's output, without the final layer norm.
    pub penultimate: Tensor,
    /// `last_hidden_state`: the last layer's output after the final layer norm.
    pub last: Tensor,
}

#[derive(Debug, Clone)]
pub struct TextEncoder {
    token_embedding: Embedding,
    /// `[max_position_embeddings, hidden]`; positions are implicit (0..seq_len).
    position_embedding: Tensor,
    encoder: ClipEncoder,
    final_layer_norm: LayerNormLayer,
    /// `CLIPTextModelWithProjection`'s bias-free `[projection_dim, hidden]` projection.
    text_projection: Option<LinearLayer>,
    pooling: TextPooling,
    config: ClipTextConfig,
    /// What [`lora_modules`] lists for this config.
    lora_modules: Vec<ModuleInfo>,
}

impl TextEncoder {
    /// Loads `dir/model.safetensors` (or the `.fp16` variant) in either key layout, adding
    /// `deltas` (f32, keyed by canonical `text_model.…weight` names) to the matching weights.
    pub fn load(
        dir: &Path,
        config: &ClipTextConfig,
        dtype: DType,
        device: &Device,
        deltas: BTreeMap<String, Tensor>,
    ) -> Result<Self> {
        let path = weights::component_weights(dir, "model")?;
        let prefixed = {
            let files = weights::mmap_safetensors(std::slice::from_ref(&path))?;
            if files.get(&format!("{PREFIX}{PROBE}")).is_ok() {
                true
            } else {
                ensure!(
                    files.get(PROBE).is_ok(),
                    "{} is not a CLIP text encoder: it has neither `{PREFIX}{PROBE}` nor `{PROBE}`",
                    path.display()
                );
                false
            }
        };
        let deltas = deltas
            .into_iter()
            .map(|(key, delta)| {
                let bare = key.strip_prefix(PREFIX).with_context(|| {
                    format!("text encoder adapter key `{key}`: expected a `{PREFIX}…` weight name")
                })?;
                Ok((
                    if prefixed {
                        key.clone()
                    } else {
                        bare.to_owned()
                    },
                    delta,
                ))
            })
            .collect::<Result<BTreeMap<_, _>>>()?;
        let vb = weights::var_builder(std::slice::from_ref(&path), dtype, device, deltas)?;
        let projection = Self::projection(&vb, config)?;
        let vb = if prefixed {
            vb.pp(PREFIX.trim_end_matches('.'))
        } else {
            vb
        };
        Self::new(vb, projection, config)
            .with_context(|| format!("loading the text encoder from {}", path.display()))
    }

    /// Builds the encoder from a `VarBuilder` whose names carry the `text_model.` level (how
    /// a single-file checkpoint's text encoder is presented), with any deltas already in it.
    /// A `text_projection` beside it is not read: in a whole `CLIPModel` it is the model's.
    pub fn from_var_builder(vb: VarBuilder, config: &ClipTextConfig) -> Result<Self> {
        Self::new(vb.pp(PREFIX.trim_end_matches('.')), None, config)
    }

    /// Builds the encoder from a `VarBuilder` over a whole text-encoder model, as
    /// [`from_var_builder`](Self::from_var_builder) names it, with its `text_projection.weight`
    /// beside `text_model` when it has one (a single file's SDXL second encoder).
    pub fn from_model_var_builder(vb: VarBuilder, config: &ClipTextConfig) -> Result<Self> {
        let projection = Self::projection(&vb, config)?;
        Self::new(vb.pp(PREFIX.trim_end_matches('.')), projection, config)
    }

    /// `text_projection.weight` where the file has it (`CLIPTextModelWithProjection`), sized by
    /// the config's `projection_dim`.
    fn projection(vb: &VarBuilder, config: &ClipTextConfig) -> Result<Option<LinearLayer>> {
        if !vb.contains_tensor(&format!("{PROJECTION}.weight")) {
            return Ok(None);
        }
        let dim = config.projection_dim.with_context(|| {
            format!("the weights have `{PROJECTION}.weight` but the config has no `projection_dim`")
        })?;
        Ok(Some(LinearLayer::load(
            &vb.pp(PROJECTION),
            config.hidden_size,
            dim,
            false,
        )?))
    }

    fn new(
        vb: VarBuilder,
        text_projection: Option<LinearLayer>,
        config: &ClipTextConfig,
    ) -> Result<Self> {
        let (hidden, eps) = (config.hidden_size, config.layer_norm_eps);
        let embeddings = vb.pp("embeddings");
        let token_embedding =
            candle_nn::embedding(config.vocab_size, hidden, embeddings.pp("token_embedding"))?;
        let position_embedding = embeddings.get(
            (config.max_position_embeddings, hidden),
            "position_embedding.weight",
        )?;
        let encoder = ClipEncoder::new(vb.pp("encoder"), config.into())?;
        let final_layer_norm = LayerNormLayer::load(&vb.pp("final_layer_norm"), hidden, eps)?;
        Ok(Self {
            token_embedding,
            position_embedding,
            encoder,
            final_layer_norm,
            text_projection,
            pooling: TextPooling::of(config),
            config: config.clone(),
            lora_modules: lora_modules(config),
        })
    }

    /// `ids`: `[batch, seq]` u32 token ids, seq ≤ max_position_embeddings (77 for SD). Returns the
    /// `[batch, seq, hidden]` last hidden state. No padding mask, as SD pipelines call it: padding
    /// positions still attend causally to everything before them.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(self.forward_states(ids)?.last)
    }

    /// [`Self::forward`] keeping the penultimate layer's output too (what SDXL conditions on).
    pub fn forward_states(&self, ids: &Tensor) -> Result<TextEncoderStates> {
        let xs = self.embed(ids)?;
        let (penultimate, last) = self
            .encoder
            .forward_with_penultimate(&xs, AttentionMask::Causal)?;
        Ok(TextEncoderStates {
            penultimate,
            last: self.final_layer_norm.forward(&last)?,
        })
    }

    /// Token plus position embeddings of `[batch, seq]` ids.
    fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (_, seq) = ids
            .dims2()
            .context("text encoder input ids: expected [batch, seq]")?;
        ensure!(
            seq <= self.config.max_position_embeddings,
            "text encoder input has {seq} tokens; the model has {} positions",
            self.config.max_position_embeddings
        );
        let positions = self.position_embedding.narrow(0, 0, seq)?;
        Ok(self
            .token_embedding
            .forward(ids)?
            .broadcast_add(&positions)?)
    }

    /// transformers' `pooler_output` (`[batch, hidden]`: each row's end-token state in
    /// `last_hidden_state`, see [`TextPooling`]), then `text_projection` where the model has it
    /// (`CLIPTextModelWithProjection`'s `text_embeds`, SDXL's pooled embedding).
    pub fn pooled_output(&self, ids: &Tensor, last_hidden_state: &Tensor) -> Result<Tensor> {
        let (batch, seq, width) = last_hidden_state.dims3()?;
        let positions =
            pooled_positions(&ids.to_dtype(DType::U32)?.to_vec2::<u32>()?, self.pooling)?;
        let rows: Vec<u32> = positions
            .iter()
            .enumerate()
            .map(|(row, &position)| (row * seq + position) as u32)
            .collect();
        let rows = Tensor::new(rows, last_hidden_state.device())?;
        let pooled = last_hidden_state
            .reshape((batch * seq, width))?
            .index_select(&rows, 0)?;
        match &self.text_projection {
            Some(projection) => Ok(projection.forward(&pooled)?),
            None => Ok(pooled),
        }
    }

    /// Where [`Self::pooled_output`] reads each row.
    pub fn pooling(&self) -> TextPooling {
        self.pooling
    }

    /// Whether the weights had `text_projection.weight` (a `CLIPTextModelWithProjection`).
    pub fn has_projection(&self) -> bool {
        self.text_projection.is_some()
    }

    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    /// The modules an adapter can attach to (paths with the `text_model.` level).
    pub fn lora_modules(&self) -> &[ModuleInfo] {
        &self.lora_modules
    }

    /// Attaches an adapter (module path → weights, paths as [`Self::lora_modules`] gives them)
    /// under `name` with `multiplier`, unmerged; nothing is attached unless every module fits.
    pub fn attach_adapter(
        &mut self,
        name: &str,
        modules: &AdapterModules,
        multiplier: f64,
    ) -> Result<()> {
        let known = self.lora_modules.clone();
        let prefix = format!("{PREFIX}encoder");
        attach_checked("text encoder", &known, name, modules, multiplier, |f| {
            self.encoder.visit(&prefix, f)
        })
    }

    /// The frozen weight of every adaptable layer, by module path as [`Self::lora_modules`]
    /// gives them.
    pub fn adaptable_weights(&mut self) -> Result<BTreeMap<String, Tensor>> {
        let mut weights = BTreeMap::new();
        self.encoder
            .visit(&format!("{PREFIX}encoder"), &mut |path, layer| {
                weights.insert(path.to_string(), layer.weight().clone());
                Ok(())
            })?;
        Ok(weights)
    }

    /// Removes the adapter attached under `name` from every layer.
    pub fn detach_adapter(&mut self, name: &str) -> Result<()> {
        let mut found = false;
        self.encoder
            .visit(&format!("{PREFIX}encoder"), &mut |_, layer| {
                found |= layer.detach(name);
                Ok(())
            })?;
        ensure!(found, "no adapter named `{name}` is attached");
        Ok(())
    }
}

/// For each row of ids, the position whose hidden state is the pooled output.
fn pooled_positions(ids: &[Vec<u32>], pooling: TextPooling) -> Result<Vec<usize>> {
    ids.iter()
        .enumerate()
        .map(|(row, ids)| match pooling {
            TextPooling::HighestId => {
                let highest = ids.iter().max().context("empty input ids")?;
                Ok(ids
                    .iter()
                    .position(|id| id == highest)
                    .expect("the max is in the row"))
            }
            // transformers silently pools at position 0 when the end token is missing.
            TextPooling::FirstEndToken(end) => {
                ids.iter().position(|&id| id == end).with_context(|| {
                    format!(
                        "input ids row {row} has no end token (id {end}), where the text is pooled"
                    )
                })
            }
        })
        .collect()
}

/// The modules kohya's `lora_te_` keys and peft's text-encoder adapters name: the four attention
/// projections and the two MLP layers of every encoder layer.
pub fn lora_modules(config: &ClipTextConfig) -> Vec<ModuleInfo> {
    let (hidden, inner) = (config.hidden_size, config.intermediate_size);
    let module = |path: String, in_features, out_features| ModuleInfo {
        path,
        kind: ModuleKind::Linear,
        in_features,
        out_features,
    };
    (0..config.num_hidden_layers)
        .flat_map(|i| {
            let layer = format!("{PREFIX}encoder.layers.{i}");
            let attn = ["q_proj", "k_proj", "v_proj", "out_proj"]
                .map(|p| module(format!("{layer}.self_attn.{p}"), hidden, hidden));
            let mlp = [
                module(format!("{layer}.mlp.fc1"), hidden, inner),
                module(format!("{layer}.mlp.fc2"), inner, hidden),
            ];
            attn.into_iter().chain(mlp)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::max_diff;

    fn tiny_config(act: &str) -> ClipTextConfig {
        ClipTextConfig::parse(&format!(
            r#"{{"vocab_size": 50, "hidden_size": 8, "intermediate_size": 12, "num_hidden_layers": 2,
                "num_attention_heads": 2, "max_position_embeddings": 10, "hidden_act": "{act}",
                "layer_norm_eps": 1e-5}}"#
        ))
        .unwrap()
    }

    /// Random weights for `config` under `prefix`, in transformers' names.
    fn random_weights(config: &ClipTextConfig, prefix: &str) -> BTreeMap<String, Tensor> {
        let dev = Device::Cpu;
        let (h, i) = (config.hidden_size, config.intermediate_size);
        let mut shapes: Vec<(String, Vec<usize>)> = vec![
            (
                "embeddings.token_embedding.weight".into(),
                vec![config.vocab_size, h],
            ),
            (
                "embeddings.position_embedding.weight".into(),
                vec![config.max_position_embeddings, h],
            ),
            ("final_layer_norm.weight".into(), vec![h]),
            ("final_layer_norm.bias".into(), vec![h]),
        ];
        for m in lora_modules(config) {
            let path = m.path.strip_prefix(PREFIX).unwrap().to_owned();
            shapes.push((
                format!("{path}.weight"),
                vec![m.out_features, m.in_features],
            ));
            shapes.push((format!("{path}.bias"), vec![m.out_features]));
        }
        for l in 0..config.num_hidden_layers {
            for n in ["layer_norm1", "layer_norm2"] {
                shapes.push((format!("encoder.layers.{l}.{n}.weight"), vec![h]));
                shapes.push((format!("encoder.layers.{l}.{n}.bias"), vec![h]));
            }
        }
        assert!(shapes.iter().any(|(_, s)| s == &[i, h]));
        shapes
            .into_iter()
            .map(|(name, shape)| {
                (
                    format!("{prefix}{name}"),
                    Tensor::randn(0f32, 0.5, shape, &dev).unwrap(),
                )
            })
            .collect()
    }

    fn save(dir: &Path, tensors: &BTreeMap<String, Tensor>) {
        let tensors: std::collections::HashMap<_, _> = tensors.clone().into_iter().collect();
        candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
    }

    #[test]
    fn lists_six_modules_per_layer() {
        let modules = lora_modules(&tiny_config("gelu"));
        assert_eq!(modules.len(), 12);
        assert_eq!(
            modules[0].path,
            "text_model.encoder.layers.0.self_attn.q_proj"
        );
        let fc1 = &modules[4];
        assert_eq!(
            (fc1.path.as_str(), fc1.in_features, fc1.out_features),
            ("text_model.encoder.layers.0.mlp.fc1", 8, 12)
        );
        assert_eq!(modules[11].path, "text_model.encoder.layers.1.mlp.fc2");
    }

    #[test]
    fn both_key_layouts_load_and_deltas_use_canonical_names() {
        let config = tiny_config("quick_gelu");
        let weights = random_weights(&config, PREFIX);
        let (with_prefix, without_prefix) =
            (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        save(with_prefix.path(), &weights);
        let bare = weights
            .iter()
            .map(|(k, v)| (k.strip_prefix(PREFIX).unwrap().to_owned(), v.clone()))
            .collect();
        save(without_prefix.path(), &bare);

        let ids = Tensor::new(&[[1u32, 7, 3, 9, 9], [2, 2, 5, 0, 0]], &Device::Cpu).unwrap();
        let key = "text_model.encoder.layers.1.self_attn.v_proj.weight".to_owned();
        let delta = Tensor::randn(0f32, 0.1, (8, 8), &Device::Cpu).unwrap();
        let mut outputs = Vec::new();
        for dir in [with_prefix.path(), without_prefix.path()] {
            for deltas in [
                BTreeMap::new(),
                BTreeMap::from([(key.clone(), delta.clone())]),
            ] {
                let te = TextEncoder::load(dir, &config, DType::F32, &Device::Cpu, deltas).unwrap();
                let out = te.forward(&ids).unwrap();
                assert_eq!(out.dims(), &[2, 5, 8]);
                outputs.push(out);
            }
        }
        assert_eq!(
            max_diff(&outputs[0], &outputs[2]),
            0.0,
            "layouts must load the same weights"
        );
        assert_eq!(
            max_diff(&outputs[1], &outputs[3]),
            0.0,
            "deltas must apply in both layouts"
        );
        assert!(
            max_diff(&outputs[0], &outputs[1]) > 1e-4,
            "the delta must change the output"
        );

        let err = TextEncoder::load(
            without_prefix.path(),
            &config,
            DType::F32,
            &Device::Cpu,
            BTreeMap::from([("encoder.layers.0.mlp.fc1.weight".to_owned(), delta)]),
        )
        .err()
        .unwrap();
        assert!(
            format!("{err:#}").contains("expected a `text_model.…` weight name"),
            "{err:#}"
        );
    }

    #[test]
    fn causal_attention_ignores_later_tokens() {
        let config = tiny_config("gelu");
        let dir = tempfile::tempdir().unwrap();
        save(dir.path(), &random_weights(&config, PREFIX));
        let te = TextEncoder::load(
            dir.path(),
            &config,
            DType::F32,
            &Device::Cpu,
            BTreeMap::new(),
        )
        .unwrap();
        let a = te
            .forward(&Tensor::new(&[[1u32, 2, 3, 4]], &Device::Cpu).unwrap())
            .unwrap();
        let b = te
            .forward(&Tensor::new(&[[1u32, 2, 30, 40]], &Device::Cpu).unwrap())
            .unwrap();
        let first_two = |t: &Tensor| {
            t.narrow(1, 0, 2)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(first_two(&a), first_two(&b));
        assert_ne!(
            a.narrow(1, 2, 1)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            b.narrow(1, 2, 1)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        );

        let too_long = Tensor::zeros((1, 11), DType::U32, &Device::Cpu).unwrap();
        assert!(format!("{:#}", te.forward(&too_long).unwrap_err()).contains("has 11 tokens"));
    }

    #[test]
    fn rejects_a_file_that_is_not_a_clip_text_model() {
        let dir = tempfile::tempdir().unwrap();
        save(
            dir.path(),
            &BTreeMap::from([(
                "foo.weight".to_owned(),
                Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap(),
            )]),
        );
        let err = TextEncoder::load(
            dir.path(),
            &tiny_config("gelu"),
            DType::F32,
            &Device::Cpu,
            BTreeMap::new(),
        )
        .err()
        .unwrap();
        assert!(
            format!("{err:#}").contains("is not a CLIP text encoder"),
            "{err:#}"
        );
    }

    #[test]
    fn pools_where_transformers_does() {
        let ids = vec![vec![9, 5, 7, 9, 2, 2], vec![9, 2, 4, 2, 1, 1]];
        assert_eq!(
            pooled_positions(&ids, TextPooling::HighestId).unwrap(),
            [0, 0]
        );
        assert_eq!(
            pooled_positions(&ids, TextPooling::FirstEndToken(2)).unwrap(),
            [4, 1]
        );
        let err = pooled_positions(&ids, TextPooling::FirstEndToken(7)).unwrap_err();
        assert!(
            format!("{err:#}").contains("row 1 has no end token (id 7)"),
            "{err:#}"
        );
    }
}
