//! `lora-infer`: a thin command-line front end over the `lora_infer` library.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

use anyhow::{ensure, Context, Result};
use clap::Parser;
use lora_infer::lora_core::models::source::ModelSource;
use lora_infer::output::{self, Image8};
use lora_infer::pipeline::check_image_size;
use lora_infer::{
    parse_device, GenerateOptions, InitImage, LoraSpec, Pipeline, Precision, SchedulerKind,
};

/// Generate images with a Stable Diffusion 1.x/2.x model and LoRA adapters.
#[derive(Parser)]
#[command(name = "lora-infer", version)]
struct Cli {
    /// Base model: a diffusers folder, a Hugging Face Hub id, or a single-file SD1.x/SD2.x
    /// checkpoint (.safetensors with LDM keys; needs --base-config)
    #[arg(long)]
    base: String,
    /// For a single-file --base: a diffusers folder of the same architecture whose config files
    /// (unet/, text_encoder/, scheduler/, vae/ config.json; tokenizer/ if any) describe it; its
    /// weights are not read. The prediction type (SD2 768-v: v_prediction) comes from its
    /// scheduler config
    #[arg(long, value_name = "DIR")]
    base_config: Option<std::path::PathBuf>,
    /// Adapter file with an optional scale, FILE[:SCALE] (repeatable; UNet and, when the file has
    /// them, text-encoder modules).
    #[arg(long = "lora", value_name = "FILE[:SCALE]")]
    loras: Vec<LoraSpec>,
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value = "")]
    negative_prompt: String,
    #[arg(long, default_value_t = 30)]
    steps: usize,
    /// Classifier-free guidance scale (≤ 1 turns guidance off).
    #[arg(long, default_value_t = 7.5)]
    guidance: f64,
    /// ddim, euler, euler-a, dpm++2m or ddpm, over the model's noise schedule.
    #[arg(long, default_value = "ddim")]
    scheduler: SchedulerKind,
    /// Image width in pixels (default: the model's sample size × the VAE factor).
    #[arg(long)]
    width: Option<usize>,
    #[arg(long)]
    height: Option<usize>,
    /// Seed of the first image; image i uses seed + i (default: random).
    #[arg(long)]
    seed: Option<u64>,
    /// Number of images (default 1, or the number in --latents).
    #[arg(long)]
    num_images: Option<usize>,
    #[arg(long, default_value_t = 1)]
    batch_size: usize,
    /// cpu, cuda, cuda:N, metal or metal:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    precision: Precision,
    /// Fold the adapters into the UNet weights at load (faster sampling) instead of applying them
    /// unmerged.
    #[arg(long)]
    fuse: bool,
    /// A .png path (several images: NAME-0.png, NAME-1.png…) or a directory.
    #[arg(long)]
    output: PathBuf,
    /// Also write a contact sheet of all images (NAME-grid.png, or grid.png in a directory).
    #[arg(long)]
    grid: bool,
    /// Initial noise from a safetensors file (key `latents`, [N, C, h, w]); scaled by the
    /// scheduler's initial noise sigma as diffusers scales a passed `latents=`.
    #[arg(long, value_name = "FILE.safetensors")]
    latents: Option<PathBuf>,
    /// img2img: start from this image (PNG, JPEG or WebP; its size is the output size) instead
    /// of from pure noise.
    #[arg(long, value_name = "IMAGE")]
    init_image: Option<PathBuf>,
    /// img2img: the part of the schedule to run, in (0, 1] (1 ignores the image's content).
    #[arg(long, default_value_t = 0.8)]
    strength: f64,
    /// Write the final latents (key `latents`, before VAE scaling) and the decoded images in
    /// [-1, 1] before clamping (key `image`).
    #[arg(long, value_name = "FILE.safetensors")]
    save_latents: Option<PathBuf>,
}

fn main() -> Result<()> {
    // SAFETY: first thing in `main`, before any other thread exists.
    unsafe { lora_core::process_setup::configure() };
    let cli = Cli::parse();
    let device = parse_device(&cli.device)?;
    let model = ModelSource::parse(&cli.base)?
        .with_configs_from(cli.base_config.clone())?
        .open()?;
    let init_latents = cli
        .latents
        .as_deref()
        .map(|p| output::read_latents(p, &device))
        .transpose()?;
    let num_images = match (&init_latents, cli.num_images) {
        (Some(l), Some(n)) => {
            let in_file = l.dim(0)?;
            ensure!(
                n == in_file,
                "--num-images {n} but --latents holds {in_file} latents"
            );
            n
        }
        (Some(l), None) => l.dim(0)?,
        (None, n) => n.unwrap_or(1),
    };
    let seed = cli.seed.unwrap_or_else(random_seed);
    let init_image = cli
        .init_image
        .as_deref()
        .map(|p| output::read_image(p, &device))
        .transpose()?;
    if let Some(image) = &init_image {
        let (_, _, h, w) = image.dims4()?;
        // No resizing: a different size would silently change the composition.
        for (what, wanted, actual) in [("width", cli.width, w), ("height", cli.height, h)] {
            ensure!(
                wanted.is_none_or(|v| v == actual),
                "--{what} {} differs from the init image's {actual}; resize the image instead",
                wanted.unwrap_or_default()
            );
        }
    }
    let options = GenerateOptions {
        prompt: cli.prompt.clone(),
        negative_prompt: cli.negative_prompt.clone(),
        steps: cli.steps,
        guidance: cli.guidance,
        scheduler: cli.scheduler,
        width: cli.width,
        height: cli.height,
        num_images,
        batch_size: cli.batch_size.min(num_images),
        seed,
        init_latents,
        init_image: init_image.map(InitImage::Pixels),
        strength: cli.strength,
    };
    // Size errors before the (slow) model load.
    let factor = model.vae_config()?.map_or(1, |c| c.vae_scale_factor());
    for (what, size) in [("width", cli.width), ("height", cli.height)] {
        if let Some(size) = size {
            check_image_size(what, size, factor)?;
        }
    }
    let (paths, grid_path) = output::image_paths(&cli.output, num_images)?;
    if let Some(dir) = grid_path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the output folder {}", dir.display()))?;
    }

    eprintln!(
        "loading {} ({})",
        model.root().display(),
        cli.precision.name()
    );
    let pipeline = Pipeline::load(&model, &cli.loras, &device, cli.precision.dtype(), cli.fuse)?;
    let (width, height) = pipeline.image_size(&options)?;
    for warning in pipeline.prompt_warnings(&options) {
        eprintln!("warning: {warning}");
    }
    let generated = pipeline.generate_with_progress(&options, &mut |p| {
        eprint!(
            "\rbatch {}/{}  step {}/{}",
            p.batch + 1,
            p.batches,
            p.step,
            p.steps
        );
        let _ = std::io::stderr().flush();
    })?;
    eprintln!();

    let adapters = if cli.loras.is_empty() {
        "none".to_owned()
    } else {
        cli.loras
            .iter()
            .map(LoraSpec::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let common = BTreeMap::from([
        ("prompt".to_owned(), cli.prompt.clone()),
        ("negative_prompt".to_owned(), cli.negative_prompt.clone()),
        ("steps".to_owned(), cli.steps.to_string()),
        ("guidance".to_owned(), cli.guidance.to_string()),
        ("scheduler".to_owned(), cli.scheduler.to_string()),
        ("size".to_owned(), format!("{width}x{height}")),
        ("model".to_owned(), cli.base.clone()),
        ("adapters".to_owned(), adapters.clone()),
        ("fused".to_owned(), cli.fuse.to_string()),
        ("precision".to_owned(), cli.precision.name().to_owned()),
        (
            "software".to_owned(),
            format!("lora-infer {}", env!("CARGO_PKG_VERSION")),
        ),
    ]);
    let mut common = common;
    if let Some(path) = &cli.init_image {
        common.insert("init_image".to_owned(), path.display().to_string());
        common.insert("strength".to_owned(), cli.strength.to_string());
    }
    let images = output::to_images8(&generated.images)?;
    for ((image, path), seed) in images.iter().zip(&paths).zip(&generated.seeds) {
        let mut text = common.clone();
        text.insert("seed".to_owned(), seed.to_string());
        // The single `parameters` chunk A1111-style tools display.
        text.insert(
            "parameters".to_owned(),
            format!(
                "{}\nNegative prompt: {}\nSteps: {}, Sampler: {}, CFG scale: {}, Seed: {seed}, Size: {width}x{height}, Adapters: {adapters}",
                cli.prompt, cli.negative_prompt, cli.steps, cli.scheduler, cli.guidance
            ),
        );
        output::write_png(path, image, &text)?;
        eprintln!("wrote {} (seed {seed})", path.display());
    }
    if cli.grid {
        let mut text = common.clone();
        text.insert("seed".to_owned(), seeds_list(&generated.seeds));
        write_grid(&grid_path, &images, &text)?;
    }
    if let Some(path) = &cli.save_latents {
        let mut metadata = common;
        metadata.insert("seed".to_owned(), seeds_list(&generated.seeds));
        output::write_latents(path, &generated.latents, &generated.images, metadata)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

fn write_grid(
    path: &std::path::Path,
    images: &[Image8],
    text: &BTreeMap<String, String>,
) -> Result<()> {
    output::write_png(path, &output::contact_sheet(images)?, text)?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

fn seeds_list(seeds: &[u64]) -> String {
    seeds
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// A seed from the clock, for runs without --seed (it is recorded in every PNG).
fn random_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}
