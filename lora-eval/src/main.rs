//! `lora-eval`: a thin command-line front end over the `lora_eval` library.

fn main() -> anyhow::Result<()> {
    // SAFETY: first thing in `main`, before any other thread exists.
    unsafe { lora_core::process_setup::configure() };
    Ok(())
}
