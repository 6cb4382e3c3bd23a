//! `lora-train data …`: each subcommand's report, printed; the work is the library's.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{ensure, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use lora_core::models::blip::ImageCaptioner;
use lora_core::options::{DeviceSpec, Precision};
use lora_core::source::blip_model_folder;
use lora_train::auto_caption;
use lora_train::caption_edit::{self, Edits};
use lora_train::data_check::{self, CheckArgs};
use lora_train::data_prepare::{prepare, PrepareOptions};

use crate::cli::{CaptionArgs, DataCommand, PrepareArgs};

/// Runs `command`; the process's exit code. `data check` has its own (0 clean, 1 problems
/// found, 2 unreadable); the others are 0 or, with the error printed, 1.
pub fn run(command: DataCommand) -> i32 {
    let done = match command {
        DataCommand::Check(args) => return check(args),
        DataCommand::Caption(args) => caption(args),
        DataCommand::Prepare(args) => prepare_copy(args),
    };
    match done {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("Error: {e:?}");
            1
        }
    }
}

/// `lora-train data caption`: the diff of the edits (stdout), and the files written with --write.
/// With --model, the images to caption are those the dataset has without a caption (all with
/// --overwrite), found by a first plan without edits.
fn caption(args: CaptionArgs) -> Result<()> {
    let options = caption_edit::caption_options(args.dataset)?;
    let generated = match &args.model {
        Some(spec) => {
            // A plan that captions nothing yet lists the images, as the model's plan will.
            let listing = Edits {
                generated: Some(BTreeMap::new()),
                ..Edits::default()
            };
            let listed = caption_edit::plan(&args.source, &options, &listing)?;
            let wanted: Vec<PathBuf> = listed
                .images
                .into_iter()
                .filter(|(_, captioned)| args.overwrite || !captioned)
                .map(|(image, _)| image)
                .collect();
            Some(model_captions(
                spec,
                &wanted,
                args.batch_size,
                args.max_new_tokens,
                args.precision,
                args.device,
            )?)
        }
        None => None,
    };
    let edits = Edits {
        prefix: args.prefix,
        from_folder_names: args.from_folder_names,
        generated,
        overwrite: args.overwrite,
        replace: args.replace,
        remove_tags: args.remove_tag,
    };
    let plan = caption_edit::plan(&args.source, &options, &edits)?;
    print!("{}", plan.diff());
    let counts = format!(
        "{} unchanged, {} without a caption left alone",
        plan.unchanged, plan.uncaptioned
    );
    if args.write {
        plan.write()?;
        let files = plan.files().count();
        eprintln!(
            "{} caption(s) changed in {files} file(s); {counts}",
            plan.changes.len()
        );
    } else {
        eprintln!(
            "{} caption(s) would change; {counts} (a dry run: pass --write to change the files)",
            plan.changes.len()
        );
    }
    Ok(())
}

/// BLIP's captions of `images`, with a progress bar; images it gives no words are named.
fn model_captions(
    spec: &str,
    images: &[PathBuf],
    batch_size: usize,
    max_new_tokens: usize,
    precision: Precision,
    device: DeviceSpec,
) -> Result<BTreeMap<PathBuf, String>> {
    if images.is_empty() {
        eprintln!(
            "every image has a caption: nothing for the model to do (--overwrite to redo all)"
        );
        return Ok(BTreeMap::new());
    }
    precision.check_device(device)?;
    let folder = blip_model_folder(spec)?;
    let captioner = ImageCaptioner::load(&folder, precision.dtype(), &device.open()?)
        .with_context(|| format!("loading the captioning model {spec}"))?;
    let bar = ProgressBar::new(images.len() as u64).with_style(
        ProgressStyle::with_template("captioning {bar:30} {pos}/{len} images, {eta} left")
            .expect("a valid template"),
    );
    let made = auto_caption::caption_images(
        &captioner,
        images,
        batch_size,
        max_new_tokens,
        &mut |done| bar.set_position(done as u64),
    )?;
    bar.finish_and_clear();
    for image in &made.empty {
        eprintln!(
            "warning: the model gave {} no words; it stays without a caption",
            image.display()
        );
    }
    Ok(made.captions)
}

/// `lora-train data prepare`: the copy written, and what was dropped.
fn prepare_copy(args: PrepareArgs) -> Result<()> {
    let mut problems = Vec::new();
    let scan = args.dataset.resolve(args.drop_bad, &mut problems);
    ensure!(problems.is_empty(), "{}", problems.join("\n"));
    let options = PrepareOptions {
        resolution: args.resolution,
        buckets: args.buckets,
        dedupe: args.dedupe,
        overwrite: args.overwrite,
    };
    let report = prepare(&args.source, &scan, &args.output, &options)?;
    for dropped in &report.dropped {
        eprintln!("dropped {}: {}", dropped.file, dropped.reason);
    }
    for item in &report.repeats_not_kept {
        eprintln!(
            "warning: {} was repeated {} times per epoch; the prepared copy shows it once",
            item.file, item.repeats
        );
    }
    eprintln!(
        "{} image(s) written to {} ({} dropped; report.json lists them)",
        report.kept,
        report.output.display(),
        report.dropped.len()
    );
    Ok(())
}

/// `lora-train data check`: the report on stdout; the exit code 0 when nothing is wrong, 1 when
/// problems were found, 2 when the options are wrong or the dataset cannot be read at all (clap's
/// code for usage errors).
fn check(args: CheckArgs) -> i32 {
    let (source, json) = (args.source.clone(), args.json);
    let report = match args
        .resolve()
        .and_then(|options| data_check::check(&source, &options))
    {
        Ok(report) => report,
        Err(e) => {
            eprintln!("error: {e:#}");
            return 2;
        }
    };
    if json {
        match serde_json::to_string_pretty(&report) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                eprintln!("error: cannot write the report as JSON: {e}");
                return 2;
            }
        }
    } else {
        print!("{report}");
    }
    if report.is_clean() {
        0
    } else {
        1
    }
}
