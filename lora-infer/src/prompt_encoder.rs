//! The text side of generation: a prompt and its negative turned into what the UNet is
//! conditioned on, with one CLIP text encoder (SD 1.x/2.x, `StableDiffusionPipeline`) or SDXL's
//! two (`StableDiffusionXLPipeline`, which adds the pooled embedding).

use anyhow::Result;
use candle_core::{Device, Tensor};
use lora_core::models::sdxl_prompt::{SdxlPromptEmbeddings, SdxlTextEncoders};
use lora_core::models::text_encoder::TextEncoder;
use lora_core::models::tokenizer::{ClipTokenizer, TokenizedPrompt};
use lora_core::source::ModelFolder;

/// The text encoder(s) and tokenizer(s) of a pipeline.
#[allow(clippy::large_enum_variant)] // one per pipeline, built once and never moved in a loop
pub enum PromptEncoder {
    /// SD 1.x/2.x: one encoder's last hidden state.
    Clip {
        text_encoder: TextEncoder,
        tokenizer: ClipTokenizer,
    },
    /// SDXL: both encoders' penultimate states and the second's pooled embedding.
    Sdxl {
        encoders: SdxlTextEncoders,
        /// `force_zeros_for_empty_prompt`: an empty negative prompt is zeros.
        zeros_for_empty_negative: bool,
    },
}

/// `[uncond; cond]` (or `[cond]` without guidance) conditioning, one row each.
#[derive(Debug, Clone)]
pub struct EncodedPrompts {
    /// `[1 or 2, seq, width]`: the cross-attention context.
    pub context: Tensor,
    /// `[1 or 2, P]`: SDXL's pooled text embedding.
    pub pooled: Option<Tensor>,
}

impl PromptEncoder {
    /// SDXL's two loaded encoders and first tokenizer, with `model`'s second tokenizer and its
    /// zero-negative flag (`model_index.json`).
    pub fn sdxl(
        model: &ModelFolder,
        text_encoder: TextEncoder,
        tokenizer: ClipTokenizer,
        text_encoder_2: TextEncoder,
    ) -> Result<Self> {
        Ok(Self::Sdxl {
            encoders: SdxlTextEncoders::new(
                text_encoder,
                text_encoder_2,
                tokenizer,
                model.tokenizer_2()?,
            )?,
            zeros_for_empty_negative: model.zeros_for_empty_negative(),
        })
    }

    /// The context width, which the UNet's `cross_attention_dim` must equal.
    pub fn context_width(&self) -> usize {
        match self {
            Self::Clip { text_encoder, .. } => text_encoder.config().hidden_size,
            Self::Sdxl { encoders, .. } => encoders.context_width(),
        }
    }

    /// Whether the pipeline passes a pooled embedding (SDXL).
    pub fn has_pooled(&self) -> bool {
        matches!(self, Self::Sdxl { .. })
    }

    fn tokenizers(&self) -> Vec<&ClipTokenizer> {
        match self {
            Self::Clip { tokenizer, .. } => vec![tokenizer],
            Self::Sdxl { encoders, .. } => vec![&encoders.tokenizer, &encoders.tokenizer_2],
        }
    }

    /// The tokens a prompt may have before it is cut (the context length less the start and end
    /// tokens).
    pub fn max_prompt_tokens(&self) -> usize {
        self.tokenizers()
            .iter()
            .map(|t| t.max_length())
            .min()
            .unwrap_or(0)
            .saturating_sub(2)
    }

    /// Whether `text` is longer than a tokenizer takes.
    pub fn truncates(&self, text: &str) -> bool {
        self.tokenizers().iter().any(|t| t.encode(text).truncated)
    }

    /// Encodes `[negative, prompt]` with guidance, `[prompt]` without, on `device`.
    pub fn encode(
        &self,
        prompt: &str,
        negative: &str,
        guided: bool,
        device: &Device,
    ) -> Result<EncodedPrompts> {
        match self {
            Self::Clip {
                text_encoder,
                tokenizer,
            } => {
                let mut prompts = Vec::with_capacity(2);
                if guided {
                    prompts.push(tokenizer.encode(negative));
                }
                prompts.push(tokenizer.encode(prompt));
                let ids = TokenizedPrompt::batch_tensor(&prompts, device)?;
                Ok(EncodedPrompts {
                    context: text_encoder.forward(&ids)?,
                    pooled: None,
                })
            }
            Self::Sdxl {
                encoders,
                zeros_for_empty_negative,
            } => {
                let embeddings = if !guided {
                    encoders.encode(&[prompt], device)?
                } else if negative.is_empty() && *zeros_for_empty_negative {
                    let cond = encoders.encode(&[prompt], device)?;
                    let zeros = cond.zeros_like()?;
                    SdxlPromptEmbeddings {
                        context: Tensor::cat(&[&zeros.context, &cond.context], 0)?,
                        pooled: Tensor::cat(&[&zeros.pooled, &cond.pooled], 0)?,
                    }
                } else {
                    // One pass for both rows, as the CLIP branch does.
                    encoders.encode(&[negative, prompt], device)?
                };
                Ok(EncodedPrompts {
                    context: embeddings.context,
                    pooled: Some(embeddings.pooled),
                })
            }
        }
    }
}
