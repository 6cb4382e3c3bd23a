//! `lora-merge`: a thin command-line front end over the `lora_merge` library.

use clap::Parser;

/// Fold LoRA adapters into checkpoints; SVD merge, extract, resize, inspect (issue #4: not implemented yet)
#[derive(Parser)]
#[command(name = "lora-merge", version)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    anyhow::bail!("lora-merge is not implemented yet; see the project's issue tracker")
}
