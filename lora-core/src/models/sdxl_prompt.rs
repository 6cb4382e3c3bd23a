//! SDXL's prompt encoding (diffusers `StableDiffusionXLPipeline.encode_prompt`): each prompt is
//! tokenized by both tokenizers (the second pads with `!`), the two encoders' penultimate hidden
//! states are concatenated along the width (CLIP ViT-L's 768 + OpenCLIP ViT-bigG's 1280 = the
//! UNet's 2048-wide context), and the second encoder's projected pooled output is the UNet's
//! pooled text embedding. An empty negative prompt is all zeros in both, as SDXL base's
//! `force_zeros_for_empty_prompt` has it.

use anyhow::{ensure, Context, Result};
use candle_core::{Device, Tensor};

use crate::models::text_encoder::TextEncoder;
use crate::models::tokenizer::{ClipTokenizer, TokenizedPrompt};

/// What the UNet is conditioned on for a batch of prompts.
#[derive(Debug, Clone)]
pub struct SdxlPromptEmbeddings {
    /// `[batch, 77, width₁ + width₂]`: the cross-attention context.
    pub context: Tensor,
    /// `[batch, projection_dim]`: the second encoder's pooled, projected output.
    pub pooled: Tensor,
}

impl SdxlPromptEmbeddings {
    /// `force_zeros_for_empty_prompt`: zeros shaped like these, for the empty negative prompt.
    pub fn zeros_like(&self) -> Result<Self> {
        Ok(Self {
            context: self.context.zeros_like()?,
            pooled: self.pooled.zeros_like()?,
        })
    }
}

/// The two text encoders of SDXL and their tokenizers.
pub struct SdxlTextEncoders {
    /// CLIP ViT-L (`text_encoder/`, `lora_te1_`).
    pub text_encoder: TextEncoder,
    /// OpenCLIP ViT-bigG with its projection (`text_encoder_2/`, `lora_te2_`).
    pub text_encoder_2: TextEncoder,
    pub tokenizer: ClipTokenizer,
    pub tokenizer_2: ClipTokenizer,
}

impl SdxlTextEncoders {
    /// Checks that the second encoder has the projection SDXL's pooled embedding comes from.
    pub fn new(
        text_encoder: TextEncoder,
        text_encoder_2: TextEncoder,
        tokenizer: ClipTokenizer,
        tokenizer_2: ClipTokenizer,
    ) -> Result<Self> {
        ensure!(
            text_encoder_2.has_projection(),
            "SDXL's second text encoder must be a CLIPTextModelWithProjection: its weights have no `text_projection.weight`"
        );
        Ok(Self {
            text_encoder,
            text_encoder_2,
            tokenizer,
            tokenizer_2,
        })
    }

    /// The context width the UNet's `cross_attention_dim` must equal.
    pub fn context_width(&self) -> usize {
        self.text_encoder.config().hidden_size + self.text_encoder_2.config().hidden_size
    }

    /// Both tokenizations of `prompts`, as `[batch, 77]` id tensors, and whether any prompt was
    /// cut to fit.
    pub fn tokenize(&self, prompts: &[&str], device: &Device) -> Result<(Tensor, Tensor, bool)> {
        ensure!(!prompts.is_empty(), "no prompts to encode");
        let first: Vec<TokenizedPrompt> =
            prompts.iter().map(|p| self.tokenizer.encode(p)).collect();
        let second: Vec<TokenizedPrompt> =
            prompts.iter().map(|p| self.tokenizer_2.encode(p)).collect();
        let truncated = first.iter().chain(&second).any(|p| p.truncated);
        Ok((
            TokenizedPrompt::batch_tensor(&first, device)?,
            TokenizedPrompt::batch_tensor(&second, device)?,
            truncated,
        ))
    }

    /// Encodes token ids from [`Self::tokenize`].
    pub fn encode_ids(&self, ids: &Tensor, ids_2: &Tensor) -> Result<SdxlPromptEmbeddings> {
        let first = self.text_encoder.forward_states(ids)?;
        let second = self.text_encoder_2.forward_states(ids_2)?;
        let pooled = self.text_encoder_2.pooled_output(ids_2, &second.last)?;
        let context = Tensor::cat(
            &[
                &first.penultimate,
                &second.penultimate.to_dtype(first.penultimate.dtype())?,
            ],
            2,
        )
        .context("concatenating the two text encoders' hidden states")?;
        Ok(SdxlPromptEmbeddings { context, pooled })
    }

    /// Tokenizes and encodes `prompts` on `device`.
    pub fn encode(&self, prompts: &[&str], device: &Device) -> Result<SdxlPromptEmbeddings> {
        let (ids, ids_2, _) = self.tokenize(prompts, device)?;
        self.encode_ids(&ids, &ids_2)
    }
}
