//! Smoke tests of the `lora-merge` binary: exit codes, messages and outputs of each subcommand.

use std::path::PathBuf;
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lora-merge"))
        .args(args)
        .output()
        .expect("the binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn merge_without_and_with_subcommand() {
    let dir = tempfile::tempdir().unwrap();
    let base = fixtures().join("sd1-tiny");
    let adapter = format!("{}:0.8", base.join("adapter_kohya.safetensors").display());
    for (i, prefix) in [vec![], vec!["merge"]].into_iter().enumerate() {
        let out = dir.path().join(format!("out{i}"));
        let mut args = prefix.clone();
        let (b, o) = (base.display().to_string(), out.display().to_string());
        args.extend([
            "--base", &b, "--lora", &adapter, "--output", &o, "--dtype", "fp16",
        ]);
        let result = run(&args);
        assert!(result.status.success(), "{}", text(&result.stderr));
        assert!(
            text(&result.stdout).contains("96 modules merged"),
            "{}",
            text(&result.stdout)
        );
        assert!(out
            .join("unet/diffusion_pytorch_model.safetensors")
            .is_file());
    }
}

#[test]
fn svd_resize_inspect_and_failures() {
    let dir = tempfile::tempdir().unwrap();
    let adapter = fixtures().join("sd2-tiny/adapter_kohya.safetensors");
    let a = adapter.display().to_string();
    let svd = dir.path().join("svd.safetensors").display().to_string();
    let result = run(&[
        "svd",
        "--lora",
        &a,
        "--lora",
        &format!("{a}:0.5"),
        "--rank",
        "2",
        "--output",
        &svd,
    ]);
    assert!(result.status.success(), "{}", text(&result.stderr));
    assert!(
        text(&result.stdout).contains("retained Frobenius energy"),
        "{}",
        text(&result.stdout)
    );

    let resized = dir.path().join("r.safetensors").display().to_string();
    let result = run(&[
        "resize",
        "--lora",
        &a,
        "--dynamic",
        "sv_ratio:2",
        "--output",
        &resized,
    ]);
    assert!(result.status.success(), "{}", text(&result.stderr));

    let result = run(&["inspect", &resized, "--json"]);
    assert!(result.status.success(), "{}", text(&result.stderr));
    let json: serde_json::Value = serde_json::from_slice(&result.stdout).unwrap();
    assert_eq!(json["format"], "kohya");
    assert_eq!(json["modules"]["text_encoder"], 12);

    let result = run(&[
        "resize",
        "--lora",
        &a,
        "--dynamic",
        "sv_magic:2",
        "--output",
        &resized,
    ]);
    assert!(!result.status.success());
    assert!(
        text(&result.stderr).contains("unknown dynamic rank method"),
        "{}",
        text(&result.stderr)
    );

    let base = fixtures().join("sd1-tiny").display().to_string();
    let out = dir.path().join("bad").display().to_string();
    let result = run(&["--base", &base, "--lora", &a, "--output", &out]);
    assert!(!result.status.success());
    assert!(
        text(&result.stderr).contains("do not fit the model"),
        "{}",
        text(&result.stderr)
    );
    assert!(!dir.path().join("bad").exists());
}
