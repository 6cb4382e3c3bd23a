//! `lora-infer`: a thin command-line front end over the `lora_infer` library.

use clap::Parser;

/// Generate images with a base model and LoRA adapters (issue #5: not implemented yet)
#[derive(Parser)]
#[command(name = "lora-infer", version)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    anyhow::bail!("lora-infer is not implemented yet; see the project's issue tracker")
}
