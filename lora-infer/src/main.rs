//! `lora-infer`: a thin command-line front end over the `lora_infer` library.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{ensure, Result};
use clap::Parser;
use cli::Cli;
use lora_infer::lora_core::options::{check_output, prepare_output, AdapterSpec};
use lora_infer::lora_core::source::{BaseChoices, BaseSpec};
use lora_infer::output::{self, Image8};
use lora_infer::pipeline::check_image_size;
use lora_infer::{GenerateOptions, InitImage, Pipeline};

mod cli;

fn main() -> Result<()> {
    // SAFETY: first thing in `main`, before any other thread exists.
    unsafe { lora_core::process_setup::configure() };
    let cli = Cli::parse();
    if let Some(note) = cli.device.auto_note() {
        eprintln!("{note}");
    }
    let device = cli.device.open()?;
    let model = BaseSpec {
        base: &cli.base,
        base_config: cli.base_config.clone(),
        allow_pickle: cli.allow_pickle,
        choices: BaseChoices {
            prediction: cli.prediction_type,
            no_ema: cli.no_ema,
        },
    }
    .open(|copy| {
        eprintln!(
            "reading the pickle --base through its safetensors copy {}",
            copy.display()
        )
    })?;
    eprintln!("base: {}", model.describe());
    let mut loras = Vec::with_capacity(cli.loras.len());
    for spec in &cli.loras {
        let readable = spec.readable(cli.allow_pickle)?;
        if readable.path != spec.path {
            eprintln!(
                "reading the pickle {} through its safetensors copy {}",
                spec.path.display(),
                readable.path.display()
            );
        }
        loras.push(readable);
    }
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
        for (what, wanted, actual) in [
            ("width", cli.sampling.width, w),
            ("height", cli.sampling.height, h),
        ] {
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
        num_images,
        batch_size: cli.batch_size.min(num_images),
        seed,
        init_latents,
        init_image: init_image.map(InitImage::Pixels),
        strength: cli.strength,
        ..cli.sampling.options_for(&model)
    };
    // Size errors before the (slow) model load.
    let factor = model.vae_config()?.map_or(1, |c| c.vae_scale_factor());
    for (what, size) in [
        ("width", cli.sampling.width),
        ("height", cli.sampling.height),
    ] {
        if let Some(size) = size {
            check_image_size(what, size, factor)?;
        }
    }
    let (paths, grid_path) = output::image_paths(&cli.output, num_images)?;
    let base = Path::new(&cli.base);
    let inputs: Vec<(&str, &Path)> = [("--base", base)]
        .into_iter()
        .chain(cli.loras.iter().map(|a| ("--lora", a.path.as_path())))
        .chain(cli.latents.as_deref().map(|p| ("--latents", p)))
        .chain(cli.init_image.as_deref().map(|p| ("--init-image", p)))
        .collect();
    let grid = cli.grid.then_some(grid_path.as_path());
    for path in paths
        .iter()
        .map(PathBuf::as_path)
        .chain(grid)
        .chain(cli.save_latents.as_deref())
    {
        check_output("--output", path, &inputs)?;
        prepare_output("--output", path, cli.overwrite)?;
    }

    eprintln!(
        "loading {} ({})",
        model.root().display(),
        cli.precision.name()
    );
    let pipeline = Pipeline::load_with(
        &model,
        &loras,
        &device,
        cli.precision.dtype(),
        cli.fuse,
        cli.allow_nonfinite,
    )?;
    for warning in pipeline.load_warnings() {
        eprintln!("warning: {warning}");
    }
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
            .map(AdapterSpec::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let common = BTreeMap::from([
        ("prompt".to_owned(), cli.prompt.clone()),
        ("negative_prompt".to_owned(), cli.negative_prompt.clone()),
        ("steps".to_owned(), cli.sampling.steps.to_string()),
        ("guidance".to_owned(), options.guidance.to_string()),
        ("scheduler".to_owned(), options.scheduler.to_string()),
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
                cli.prompt, cli.negative_prompt, cli.sampling.steps, options.scheduler, options.guidance
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
