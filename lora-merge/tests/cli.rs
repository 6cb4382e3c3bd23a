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

/// An existing output is refused without `--overwrite` (and left as it was), replaced with it.
#[test]
fn an_existing_output_needs_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let adapter = fixtures().join("sd2-tiny/adapter_kohya.safetensors");
    let a = adapter.display().to_string();
    let out = dir.path().join("r.safetensors");
    std::fs::write(&out, b"an earlier result").unwrap();
    let o = out.display().to_string();
    let resize = |extra: &[&str]| {
        let mut args = vec!["resize", "--lora", &a, "--rank", "2", "--output", &o];
        args.extend_from_slice(extra);
        run(&args)
    };
    let refused = resize(&[]);
    assert!(!refused.status.success());
    let stderr = text(&refused.stderr);
    assert!(
        stderr.contains("already exists") && stderr.contains("--overwrite") && stderr.contains(&o),
        "{stderr}"
    );
    assert_eq!(std::fs::read(&out).unwrap(), b"an earlier result");
    let replaced = resize(&["--overwrite"]);
    assert!(replaced.status.success(), "{}", text(&replaced.stderr));
    let bytes = std::fs::read(&out).unwrap();
    assert!(safetensors::SafeTensors::deserialize(&bytes).is_ok());
}

/// A pickle adapter (tests/reference/make_pickle_fixtures.py: the tensors of the kohya fixture in
/// torch.save's archive layout) is refused by default and, with `--allow-pickle`, merges to the
/// very bytes the safetensors adapter gives.
#[test]
fn a_pickle_adapter_merges_only_with_allow_pickle_and_like_its_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    let base = fixtures().join("sd1-tiny").display().to_string();
    let pickled = fixtures()
        .join("pickle/adapter_kohya.pt")
        .display()
        .to_string();
    let plain = fixtures()
        .join("sd1-tiny/adapter_kohya.safetensors")
        .display()
        .to_string();
    let merge = |adapter: &str, output: &str, extra: &[&str]| {
        let mut args = vec!["--base", &base, "--lora", adapter, "--output", output];
        args.extend_from_slice(extra);
        Command::new(env!("CARGO_BIN_EXE_lora-merge"))
            .args(&args)
            .env("XDG_CACHE_HOME", dir.path().join("cache"))
            .output()
            .unwrap()
    };
    let out = |name: &str| dir.path().join(name).display().to_string();
    let refused = merge(&pickled, &out("refused"), &[]);
    assert!(!refused.status.success());
    let stderr = text(&refused.stderr);
    assert!(
        stderr.contains("PyTorch pickle") && stderr.contains("--allow-pickle"),
        "{stderr}"
    );
    assert!(!dir.path().join("refused").exists());

    let from_pickle = merge(&pickled, &out("from-pickle"), &["--allow-pickle"]);
    assert!(
        from_pickle.status.success(),
        "{}",
        text(&from_pickle.stderr)
    );
    assert!(
        text(&from_pickle.stderr).contains("through its safetensors copy"),
        "{}",
        text(&from_pickle.stderr)
    );
    let from_plain = merge(&plain, &out("from-plain"), &[]);
    assert!(from_plain.status.success(), "{}", text(&from_plain.stderr));
    let mut compared = 0;
    for part in ["unet", "vae"] {
        let file = format!("{part}/diffusion_pytorch_model.safetensors");
        let a = std::fs::read(dir.path().join("from-pickle").join(&file)).unwrap();
        let b = std::fs::read(dir.path().join("from-plain").join(&file)).unwrap();
        let (a, b) = (
            safetensors::SafeTensors::deserialize(&a).unwrap(),
            safetensors::SafeTensors::deserialize(&b).unwrap(),
        );
        for (name, view) in a.tensors() {
            assert_eq!(
                view.data(),
                b.tensor(&name).unwrap().data(),
                "{file}: {name}"
            );
            compared += 1;
        }
    }
    assert!(compared > 0, "no tensor compared");
}

/// Pickles carrying `__reduce__` payloads (which run `touch MARKER` under Python's
/// `pickle.load`) fail with a clear message, with or without `--allow-pickle`, and run nothing.
#[test]
fn pickle_payloads_never_run() {
    const MARKER: &str = "/tmp/lora-toolkit-pickle-payload-ran";
    let _ = std::fs::remove_file(MARKER);
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("only_payload.pt", "holds no tensor"),
        ("bare_payload.pkl", "bare pickle"),
        ("reduce_payload.pt", "alpha without down/up tensors"),
    ];
    for (file, expected) in cases {
        let path = fixtures().join("pickle").join(file).display().to_string();
        for allow in [false, true] {
            let mut args = vec!["inspect", path.as_str()];
            if allow {
                args.push("--allow-pickle");
            }
            let result = Command::new(env!("CARGO_BIN_EXE_lora-merge"))
                .args(&args)
                .env("XDG_CACHE_HOME", dir.path())
                .output()
                .unwrap();
            let stderr = text(&result.stderr);
            assert!(!result.status.success(), "{file}: {stderr}");
            let expected = if allow { expected } else { "--allow-pickle" };
            assert!(stderr.contains(expected), "{file}: {stderr}");
            assert!(!stderr.contains("panicked"), "{file}: {stderr}");
        }
    }
    assert!(
        !std::path::Path::new(MARKER).exists(),
        "a pickle payload ran"
    );
}
