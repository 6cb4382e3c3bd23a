//! Fuzz entry for training recipes: the bytes as a `--config` TOML file, read and resolved as
//! `lora-train` does. Any file must become a configuration or an error naming the file (reading)
//! or listing the bad values (resolving), never a panic. Shared by `fuzz_targets/train_recipe.rs`
//! and the regression test at the workspace root.

use lora_train::TrainArgs;

pub fn run(data: &[u8]) {
    let dir = tempfile::tempdir().expect("cannot create a scratch folder");
    let path = dir.path().join("train.toml");
    std::fs::write(&path, data).expect("cannot write the recipe");

    match TrainArgs::from_toml_file(&path) {
        Ok(args) => drop(args.resolve()),
        Err(e) => {
            let message = format!("{e:#}");
            assert!(
                message.contains(&path.display().to_string()),
                "error does not name the recipe: {message}"
            );
        }
    }
}
