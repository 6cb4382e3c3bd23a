//! The command line of `lora-infer`: every flag and its value type.

use std::path::PathBuf;

use clap::Parser;
use lora_infer::lora_core::models::config::PredictionType;
use lora_infer::lora_core::options::{AdapterSpec, DeviceSpec, Precision};
use lora_infer::lora_core::source::{BASE_CONFIG_HELP, NO_EMA_HELP, PREDICTION_TYPE_HELP};
use lora_infer::SamplingArgs;

/// Generate images with a Stable Diffusion 1.x/2.x model and LoRA adapters.
#[derive(Parser)]
#[command(name = "lora-infer", version)]
pub struct Cli {
    /// Base model: a diffusers folder, a Hugging Face Hub id, or a single-file SD1.x/SD2.x
    /// checkpoint (.safetensors with LDM keys), recognised from its tensors
    #[arg(long)]
    pub base: String,
    #[arg(long, value_name = "DIR", help = BASE_CONFIG_HELP)]
    pub base_config: Option<PathBuf>,
    #[arg(long, value_name = "TYPE", help = PREDICTION_TYPE_HELP)]
    pub prediction_type: Option<PredictionType>,
    #[arg(long, help = NO_EMA_HELP)]
    pub no_ema: bool,
    /// Adapter file with an optional scale, FILE[:SCALE] (repeatable; UNet and, when the file has
    /// them, text-encoder modules).
    #[arg(long = "lora", value_name = "FILE[:SCALE]")]
    pub loras: Vec<AdapterSpec>,
    #[arg(long)]
    pub prompt: String,
    #[arg(long, default_value = "")]
    pub negative_prompt: String,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Seed of the first image; image i uses seed + i (default: random).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Number of images (default 1, or the number in --latents).
    #[arg(long)]
    pub num_images: Option<usize>,
    #[arg(long, default_value_t = 1)]
    pub batch_size: usize,
    /// auto (CUDA when built with it and a GPU is present, else the CPU), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: DeviceSpec,
    /// f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    pub precision: Precision,
    /// Fold the adapters into the UNet weights at load (faster sampling) instead of applying them
    /// unmerged.
    #[arg(long)]
    pub fuse: bool,
    /// A .png path (several images: NAME-0.png, NAME-1.png…) or a directory.
    #[arg(long)]
    pub output: PathBuf,
    /// Also write a contact sheet of all images (NAME-grid.png, or grid.png in a directory).
    #[arg(long)]
    pub grid: bool,
    /// Replace existing output files (without it they are refused).
    #[arg(long)]
    pub overwrite: bool,
    /// Read PyTorch pickle files (a .ckpt --base, .pt/.bin adapters) with a reader that never
    /// executes anything from the file [default: pickles are refused].
    #[arg(long)]
    pub allow_pickle: bool,
    /// Load adapters that hold NaN or infinity (refused by default: they spoil every image).
    #[arg(long)]
    pub allow_nonfinite: bool,
    /// Initial noise from a safetensors file (key `latents`, [N, C, h, w]); scaled by the
    /// scheduler's initial noise sigma as diffusers scales a passed `latents=`.
    #[arg(long, value_name = "FILE.safetensors")]
    pub latents: Option<PathBuf>,
    /// img2img: start from this image (PNG, JPEG or WebP; its size is the output size) instead
    /// of from pure noise.
    #[arg(long, value_name = "IMAGE")]
    pub init_image: Option<PathBuf>,
    /// img2img: the part of the schedule to run, in (0, 1] (1 ignores the image's content).
    #[arg(long, default_value_t = 0.8)]
    pub strength: f64,
    /// Write the final latents (key `latents`, before VAE scaling) and the decoded images in
    /// [-1, 1] before clamping (key `image`).
    #[arg(long, value_name = "FILE.safetensors")]
    pub save_latents: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Cli;

    /// clap checks a definition (unique argument and group names, …) only when it parses that
    /// subcommand; this checks them all.
    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }
}
