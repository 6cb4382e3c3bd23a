//! `lora-train`: a thin command-line front end over the `lora_train` library.

use clap::Parser;

/// Train a LoRA adapter on a folder of captioned images (issue #3: not implemented yet)
#[derive(Parser)]
#[command(name = "lora-train", version)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    anyhow::bail!("lora-train is not implemented yet; see the project's issue tracker")
}
