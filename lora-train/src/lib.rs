//! lora-train: train a LoRA adapter for a Stable Diffusion UNet on a folder of captioned images.
//!
//! Modules, in the order a run uses them: [`config`] (options, from flags and TOML),
//! [`dataset`] (finding and checking images and captions), [`cache`] (text embeddings and VAE
//! latents computed once), [`schedule`] (noise and learning-rate schedules), [`optimizer`]
//! (AdamW, Lion, Prodigy and gradient clipping), [`ema`] (the weights' moving average), [`validation`] (the held-out loss), [`masks`] (masked loss), [`objective`] (the denoising loss), [`trainer`] (the loop),
//! [`checkpoint`] (training state and the recipe a resume must match, for exact resume),
//! [`metrics`] (JSON-lines log and summary) and [`sample`] (images during training, through
//! lora-infer). Before training, [`data_check`] reports a dataset's problems and what training
//! will see of it (`lora-train data check`), [`caption_edit`] edits its captions and
//! [`auto_caption`] makes them with a captioning model (`lora-train data caption`), and
//! [`data_prepare`] writes a clean, resized copy of it
//! (`lora-train data prepare`). The `lora-train` binary is a thin front end.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use lora_train::{TrainArgs, Trainer};
//! let config = TrainArgs {
//!     base: Some("runwayml/stable-diffusion-v1-5".into()),
//!     data: Some("my-images".into()),
//!     output: Some("my-lora.safetensors".into()),
//!     ..Default::default()
//! }
//! .resolve()?;
//! let mut trainer = Trainer::new(config, &mut |_| {})?;
//! let report = trainer.step()?; // one optimizer step (what benches time)
//! println!("loss {}", report.loss);
//! # Ok(()) }
//! ```

pub mod auto_caption;
pub mod cache;
pub mod caption_edit;
pub mod checkpoint;
pub mod config;
pub mod data_check;
pub mod data_prepare;
pub mod dataset;
pub mod distributed;
pub mod ema;
pub mod masks;
pub mod metrics;
pub mod objective;
pub mod optimizer;
pub mod sample;
pub mod schedule;
pub mod trainer;
pub mod validation;

pub use config::{TrainArgs, TrainConfig};
pub use distributed::ProcessGroup;
pub use lora_core;
pub use metrics::{StepReport, TrainSummary};
pub use trainer::{checkpoint_paths, latest_checkpoint, train, Preparation, Stopped, Trainer};
