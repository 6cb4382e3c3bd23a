//! The command line of `lora-train`: training (`--config FILE` and the training options) or a
//! subcommand (`lora-train data check …`). The training options are the library's [`TrainArgs`],
//! the one schema of both the flags and the TOML file (keys spelled as the flags), so the two
//! never disagree.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
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
    Data(DataCommand),
}

/// `lora-train data …`.
#[derive(Subcommand)]
pub enum DataCommand {
    /// The dataset as training would read it: its problems (exit code 1 when there are any) and
    /// a summary of images, sizes, buckets, captions and tags
    Check(CheckArgs),
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
        let Some(Command::Data(DataCommand::Check(args))) = check.command else {
            panic!("expected data check");
        };
        assert_eq!((args.resolution, args.json), (256, true));
        assert!(Cli::try_parse_from(["lora-train", "--data", "x", "data", "check", "y"]).is_err());
    }
}
