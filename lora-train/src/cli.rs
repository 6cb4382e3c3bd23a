//! The command line of `lora-train`: `--config FILE` and the training options. The options are
//! the library's [`TrainArgs`], the one schema of both the flags and the TOML file (keys spelled
//! as the flags), so the two never disagree.

use std::path::PathBuf;

use clap::Parser;
use lora_train::TrainArgs;

/// Train a LoRA adapter for a Stable Diffusion UNet on a folder of captioned images
#[derive(Parser)]
#[command(name = "lora-train", version)]
pub struct Cli {
    /// TOML file with any of the options below (keys spelled as the flags, e.g. `batch-size = 2`);
    /// flags override it
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub args: TrainArgs,
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
