//! The command line of `lora-train`: training (`--config FILE` and the training options), a
//! `data` subcommand (`lora-train data check|caption|prepare …`) or `launch` (data-parallel
//! training on this machine). The training options are the
//! library's [`TrainArgs`], the one schema of both the flags and the TOML file (keys spelled as
//! the flags), so the two never disagree.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{ArgGroup, Args, Parser, Subcommand};
use lora_core::models::blip::DEFAULT_MAX_NEW_TOKENS;
use lora_core::options::{DeviceSpec, Precision};
use lora_train::config::DatasetArgs;
use lora_train::data_check::CheckArgs;
use lora_train::TrainArgs;

/// Train a LoRA adapter for a Stable Diffusion UNet on a folder of captioned images
#[derive(Parser)]
#[command(name = "lora-train", version, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// TOML file with any of the options below (keys spelled as the flags, e.g. `batch-size = 2`);
    /// flags override it
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub args: TrainArgs,
}

/// What `lora-train` does besides training.
#[derive(Subcommand)]
pub enum Command {
    /// Work on a training dataset
    #[command(subcommand)]
    Data(Box<DataCommand>),
    Launch(LaunchArgs),
}

/// Train on N processes of this machine at once (data-parallel: MPI on the CPU, NCCL on GPUs)
///
/// Each process takes --batch-size samples of every step and the gradients are averaged, so N
/// processes at --batch-size B train what one process at --batch-size N×B does. Only process 0
/// writes the adapter, checkpoints, samples and metrics. On the CPU (--device cpu, or auto without
/// a GPU) it runs `mpirun -np N lora-train TRAINING-OPTIONS…`, each process with an equal share of
/// the cores (RAYON_NUM_THREADS threads each, if set); needs Open MPI and a lora-train built with
/// `--features mpi`. On GPUs it starts one process per GPU (CUDA devices 0 to N-1) with torchrun's
/// variables and stops them all when one fails; needs a lora-train built with `--features nccl`.
/// For several machines, run `mpirun` or torchrun yourself (docs/DISTRIBUTED.md).
#[derive(Args)]
pub struct LaunchArgs {
    /// The number of processes
    #[arg(long, value_name = "N")]
    pub nproc: usize,
    /// The training options, as `lora-train` takes them
    #[arg(
        value_name = "TRAINING-OPTIONS",
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    pub args: Vec<OsString>,
}

#[derive(Subcommand)]
pub enum DataCommand {
    /// The dataset as training would read it: its problems (exit code 1 when there are any) and
    /// a summary of images, sizes, buckets, captions and tags
    Check(CheckArgs),
    Caption(CaptionArgs),
    Prepare(PrepareArgs),
}

/// Write a clean copy of a dataset: images at their training size, metadata.jsonl, report.json
///
/// Reads SOURCE as training does (any --data layout), then writes each kept image as a PNG
/// resized and centre-cropped to the training size (the square --resolution, or with --buckets
/// its aspect-ratio bucket of about --resolution² pixels, sides multiples of 64), its caption
/// into a metadata.jsonl (an imagefolder --data reads back) and report.json (what was kept and
/// what was dropped, and why). The source is only read. The output folder is written under a
/// temporary name and renamed: it appears whole or not at all.
///
/// Exit status: 0 done, 2 bad usage, 1 any other failure (the message names the file).
#[derive(Args)]
pub struct PrepareArgs {
    /// The dataset, as --data of training takes it
    #[arg(value_name = "SOURCE")]
    pub source: PathBuf,
    /// The folder to write (must not exist, or be a prepared dataset with --overwrite)
    #[arg(long, value_name = "DIR")]
    pub output: PathBuf,
    /// Training resolution: the square side, or the bucket area's side
    #[arg(long, default_value_t = 512)]
    pub resolution: usize,
    /// Each image at its aspect-ratio bucket instead of a centre-cropped square (kohya's
    /// enable_bucket)
    #[arg(long)]
    pub buckets: bool,
    /// Drop images whose pixels equal an earlier image's (listed in report.json)
    #[arg(long)]
    pub dedupe: bool,
    /// Drop unreadable or uncaptioned images (listed in report.json) instead of stopping
    #[arg(long)]
    pub drop_bad: bool,
    /// Replace an existing prepared dataset at --output
    #[arg(long)]
    pub overwrite: bool,
    #[command(flatten)]
    pub dataset: DatasetArgs,
}

/// Edit the captions of a kohya folder or an imagefolder, or caption images with BLIP (a diff
/// unless --write)
///
/// Each caption is read as training reads it (whitespace runs made one space), then edited in
/// this order: --from-folder-names or --model (captions for the images without one; with
/// --overwrite for every image), --replace (each in turn), --remove-tag, --prefix (the trigger
/// word: `--model … --prefix "sks, "` gives "sks, a photo of …"). Without --write nothing
/// changes: the changed captions are shown as a diff, with a count. With --write each changed
/// caption file, or the imagefolder's metadata file (other columns and row order kept), is
/// replaced atomically; images and other files are never touched. A caption the edits would
/// leave empty is an error, and then nothing is written. Only --caption-ext and --caption-column
/// of the dataset options apply.
///
/// --model runs a BLIP captioning model (transformers' BlipForConditionalGeneration, e.g.
/// Salesforce/blip-image-captioning-large: a local folder or a Hub id) with greedy decoding, as
/// transformers' generate does by default (kohya: finetune/make_captions.py with --num_beams 1).
///
/// Exit status: 0 done, 2 bad usage, 1 any other failure (the message names the file).
#[derive(Args)]
#[command(group(
    ArgGroup::new("edits")
        .required(true)
        .multiple(true)
        .args(["prefix", "from_folder_names", "model", "replace", "remove_tag"])
))]
#[command(group(ArgGroup::new("caption_source").args(["from_folder_names", "model"])))]
pub struct CaptionArgs {
    /// The dataset: a kohya folder (caption files beside the images, `N_words` sub-folders) or an
    /// imagefolder (metadata.jsonl or metadata.csv). Parquet datasets are refused
    #[arg(value_name = "SOURCE")]
    pub source: PathBuf,
    /// Put P before every caption that does not already start with it (running twice adds it
    /// once), e.g. --prefix "sks, "
    #[arg(long, value_name = "P")]
    pub prefix: Option<String>,
    /// Give each image of a kohya `N_words` folder that has no caption (or an empty one) the
    /// folder's words, written as its caption file
    #[arg(long)]
    pub from_folder_names: bool,
    /// Caption the images without a caption with this BLIP model: a folder (config.json,
    /// model.safetensors, tokenizer.json, preprocessor_config.json) or a Hub id such as
    /// Salesforce/blip-image-captioning-large
    #[arg(long, value_name = "BLIP")]
    pub model: Option<String>,
    /// With --from-folder-names or --model: replace existing captions too
    #[arg(long, requires = "caption_source")]
    pub overwrite: bool,
    /// With --model: the longest caption, in tokens (transformers 5's default for BLIP: 20)
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_NEW_TOKENS, requires = "model")]
    pub max_new_tokens: usize,
    /// With --model: images captioned at once (kohya: --batch_size)
    #[arg(long, value_name = "N", default_value_t = 4, requires = "model")]
    pub batch_size: usize,
    /// With --model: the model's dtype, f32, f16 or bf16
    #[arg(long, default_value_t = Precision::F32, requires = "model")]
    pub precision: Precision,
    /// With --model: auto (CUDA when built with it and a GPU is present), cpu, cuda or cuda:N
    #[arg(long, default_value_t = DeviceSpec::Auto, requires = "model")]
    pub device: DeviceSpec,
    /// Replace every OLD by NEW (split at the first `=`; NEW may be empty); repeat for several,
    /// applied in order
    #[arg(long, value_name = "OLD=NEW", value_parser = parse_replacement)]
    pub replace: Vec<(String, String)>,
    /// Remove the comma-separated tag T (compared trimmed, case-sensitive) and tidy the commas
    /// around it; repeat for several
    #[arg(long, value_name = "T")]
    pub remove_tag: Vec<String>,
    /// Write the changes (each file atomically) instead of showing them
    #[arg(long)]
    pub write: bool,
    #[command(flatten)]
    pub dataset: DatasetArgs,
}

/// `OLD=NEW` → (OLD, NEW), split at the first `=`.
fn parse_replacement(value: &str) -> Result<(String, String), String> {
    match value.split_once('=') {
        Some((old, new)) if !old.is_empty() => Ok((old.to_string(), new.to_string())),
        _ => Err(format!(
            "`{value}`: expected OLD=NEW with a non-empty OLD (e.g. \"dog=sks dog\")"
        )),
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::{Cli, Command, DataCommand};

    /// clap checks a definition (unique argument and group names, …) only when it parses that
    /// subcommand; this checks them all.
    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn training_flags_and_the_data_subcommand_both_parse() {
        let train =
            Cli::try_parse_from(["lora-train", "--data", "x", "--resolution", "64"]).unwrap();
        assert!(train.command.is_none());
        assert_eq!(train.args.resolution, Some(64));
        let check = Cli::try_parse_from([
            "lora-train",
            "data",
            "check",
            "x",
            "--resolution",
            "256",
            "--json",
        ])
        .unwrap();
        let Some(Command::Data(data)) = check.command else {
            panic!("expected data check");
        };
        let DataCommand::Check(args) = *data else {
            panic!("expected data check");
        };
        assert_eq!((args.resolution, args.json), (256, true));
        assert!(Cli::try_parse_from(["lora-train", "--data", "x", "data", "check", "y"]).is_err());
        // `launch` takes everything after --nproc as training options, flags included.
        let launch = Cli::try_parse_from([
            "lora-train",
            "launch",
            "--nproc",
            "2",
            "--data",
            "x",
            "--batch-size",
            "1",
        ])
        .unwrap();
        let Some(Command::Launch(launch)) = launch.command else {
            panic!("expected launch");
        };
        assert_eq!(launch.nproc, 2);
        assert_eq!(launch.args, ["--data", "x", "--batch-size", "1"]);
    }
}
