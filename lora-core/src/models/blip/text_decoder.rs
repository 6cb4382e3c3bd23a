//! BLIP's caption decoder (transformers' `BlipTextLMHeadModel`): a post-norm BERT whose layers
//! run causal self-attention, cross-attention to the image features, and a feed-forward block,
//! each followed by `LayerNorm(x + sublayer(x))`; then BERT's LM head (dense, activation, layer
//! norm, and the word embeddings, transposed, with an output-only bias).

use anyhow::{ensure, Result};
use candle_core::{DType, Module, Tensor};
use candle_nn::{Embedding, LayerNorm, Linear, VarBuilder};

use crate::models::blip::attention::{causal_mask, multi_head_attention};
use crate::models::clip::encoder::activate;
use crate::models::config::{BlipTextConfig, ClipActivation};

pub struct BlipTextDecoder {
    /// `[vocab, hidden]`: the input embeddings.
    word_embeddings: Tensor,
    /// `[vocab, hidden]`: the LM head's output weights, the same tensor as `word_embeddings`
    /// unless the config unties them.
    lm_head: Tensor,
    position_embeddings: Embedding,
    embeddings_layer_norm: LayerNorm,
    layers: Vec<DecoderLayer>,
    head_dense: Linear,
    head_layer_norm: LayerNorm,
    /// `[vocab]`
    head_bias: Tensor,
    config: BlipTextConfig,
}

/// Each layer's cross-attention keys and values for one batch of image features, computed once
/// and reused at every decoding step.
pub struct ImageKeysValues {
    per_layer: Vec<(Tensor, Tensor)>,
}

impl BlipTextDecoder {
    /// `vb` is the `text_decoder` level of a BlipForConditionalGeneration's weights.
    pub fn new(vb: VarBuilder, config: &BlipTextConfig) -> Result<Self> {
        let (h, eps) = (config.hidden_size, config.layer_norm_eps);
        let embeddings = vb.pp("bert.embeddings");
        let word_embeddings = embeddings.get((config.vocab_size, h), "word_embeddings.weight")?;
        let position_embeddings = candle_nn::embedding(
            config.max_position_embeddings,
            h,
            embeddings.pp("position_embeddings"),
        )?;
        let layers = (0..config.num_hidden_layers)
            .map(|i| DecoderLayer::new(vb.pp(format!("bert.encoder.layer.{i}")), config))
            .collect::<Result<_>>()?;
        let head = vb.pp("cls.predictions");
        // transformers ties `decoder.bias` to `predictions.bias`; files carry one or both.
        let head_bias = if head.contains_tensor("bias") {
            head.get(config.vocab_size, "bias")?
        } else {
            head.get(config.vocab_size, "decoder.bias")?
        };
        let lm_head = if config.tie_word_embeddings {
            word_embeddings.clone()
        } else {
            head.get((config.vocab_size, h), "decoder.weight")?
        };
        Ok(Self {
            word_embeddings,
            lm_head,
            position_embeddings,
            embeddings_layer_norm: candle_nn::layer_norm(h, eps, embeddings.pp("LayerNorm"))?,
            layers,
            head_dense: candle_nn::linear(h, h, head.pp("transform.dense"))?,
            head_layer_norm: candle_nn::layer_norm(h, eps, head.pp("transform.LayerNorm"))?,
            head_bias,
            config: config.clone(),
        })
    }

    /// The cross-attention keys and values for `image_embeds` (`[batch, positions,
    /// encoder_hidden_size]`, the vision tower's `last_hidden_state`).
    pub fn image_keys_values(&self, image_embeds: &Tensor) -> Result<ImageKeysValues> {
        let image_embeds = image_embeds.to_dtype(self.word_embeddings.dtype())?;
        let per_layer = self
            .layers
            .iter()
            .map(|layer| layer.cross_attention.keys_values(&image_embeds))
            .collect::<Result<_>>()?;
        Ok(ImageKeysValues { per_layer })
    }

    /// `[batch, seq]` token ids (from position 0, the `[DEC]` token) → `[batch, seq, vocab]`
    /// logits in f32. `image` must come from a batch of the same size.
    pub fn forward(&self, input_ids: &Tensor, image: &ImageKeysValues) -> Result<Tensor> {
        let input_ids = input_ids.to_dtype(DType::U32)?;
        let (batch, seq) = input_ids.dims2()?;
        ensure!(
            seq <= self.config.max_position_embeddings,
            "{seq} tokens: the decoder has {} positions",
            self.config.max_position_embeddings
        );
        let device = input_ids.device();
        let words = self
            .word_embeddings
            .index_select(&input_ids.flatten_all()?, 0)?
            .reshape((batch, seq, self.config.hidden_size))?;
        let positions = Tensor::arange(0u32, seq as u32, device)?;
        let xs = words.broadcast_add(&self.position_embeddings.forward(&positions)?)?;
        let mut xs = self.embeddings_layer_norm.forward(&xs)?;
        let mask = causal_mask(seq, device)?;
        for (layer, (keys, values)) in self.layers.iter().zip(&image.per_layer) {
            xs = layer.forward(&xs, &mask, keys, values)?;
        }
        let xs = activate(&self.head_dense.forward(&xs)?, self.config.hidden_act)?;
        let xs = self.head_layer_norm.forward(&xs)?;
        let logits = xs
            .broadcast_matmul(&self.lm_head.t()?)?
            .broadcast_add(&self.head_bias)?;
        Ok(logits.to_dtype(DType::F32)?)
    }

    pub fn config(&self) -> &BlipTextConfig {
        &self.config
    }
}

/// `bert.encoder.layer.{i}`.
struct DecoderLayer {
    self_attention: BertAttention,
    cross_attention: BertAttention,
    intermediate: Linear,
    output: Linear,
    output_layer_norm: LayerNorm,
    activation: ClipActivation,
}

impl DecoderLayer {
    fn new(vb: VarBuilder, c: &BlipTextConfig) -> Result<Self> {
        let (h, eps) = (c.hidden_size, c.layer_norm_eps);
        Ok(Self {
            self_attention: BertAttention::new(vb.pp("attention"), c, h)?,
            cross_attention: BertAttention::new(vb.pp("crossattention"), c, c.encoder_hidden_size)?,
            intermediate: candle_nn::linear(h, c.intermediate_size, vb.pp("intermediate.dense"))?,
            output: candle_nn::linear(c.intermediate_size, h, vb.pp("output.dense"))?,
            output_layer_norm: candle_nn::layer_norm(h, eps, vb.pp("output.LayerNorm"))?,
            activation: c.hidden_act,
        })
    }

    fn forward(
        &self,
        xs: &Tensor,
        mask: &Tensor,
        keys: &Tensor,
        values: &Tensor,
    ) -> Result<Tensor> {
        let (self_keys, self_values) = self.self_attention.keys_values(xs)?;
        let xs = self
            .self_attention
            .forward(xs, &self_keys, &self_values, Some(mask))?;
        let xs = self.cross_attention.forward(&xs, keys, values, None)?;
        let hidden = activate(&self.intermediate.forward(&xs)?, self.activation)?;
        Ok(self
            .output_layer_norm
            .forward(&(self.output.forward(&hidden)? + xs)?)?)
    }
}

/// `attention` / `crossattention`: `self.{query,key,value}`, then `LayerNorm(x + output.dense(·))`.
/// Keys and values come from `kv_width`-wide states (the text's, or the image features').
struct BertAttention {
    query: Linear,
    key: Linear,
    value: Linear,
    dense: Linear,
    layer_norm: LayerNorm,
    heads: usize,
}

impl BertAttention {
    fn new(vb: VarBuilder, c: &BlipTextConfig, kv_width: usize) -> Result<Self> {
        let h = c.hidden_size;
        Ok(Self {
            query: candle_nn::linear(h, h, vb.pp("self.query"))?,
            key: candle_nn::linear(kv_width, h, vb.pp("self.key"))?,
            value: candle_nn::linear(kv_width, h, vb.pp("self.value"))?,
            dense: candle_nn::linear(h, h, vb.pp("output.dense"))?,
            layer_norm: candle_nn::layer_norm(h, c.layer_norm_eps, vb.pp("output.LayerNorm"))?,
            heads: c.num_attention_heads,
        })
    }

    fn keys_values(&self, states: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((self.key.forward(states)?, self.value.forward(states)?))
    }

    fn forward(
        &self,
        xs: &Tensor,
        keys: &Tensor,
        values: &Tensor,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let attended =
            multi_head_attention(&self.query.forward(xs)?, keys, values, self.heads, mask)?;
        Ok(self
            .layer_norm
            .forward(&(self.dense.forward(&attended)? + xs)?)?)
    }
}
