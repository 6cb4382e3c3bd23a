//! LoRA-injected UNet parity with peft (per preset, two adapters at once, kohya files through
//! diffusers' loader) and gradient parity with PyTorch autograd for every adapter parameter.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use common::{expected, fixtures, get, max_abs, max_abs_diff, rel_err, CONFIGS};
use lora_toolkit::core::formats::adapter_file::{AdapterFile, ModelModules};
use lora_toolkit::core::io::weights::component_weights;
use lora_toolkit::core::models::config::UNetConfig;
use lora_toolkit::core::{Adapter, AdapterModule, LoraModule, LoraTargets, UNet2DConditionModel};

fn load_unet(cfg: &str) -> Result<UNet2DConditionModel> {
    let dir = fixtures().join(cfg).join("unet");
    let config = UNetConfig::from_file(&dir.join("config.json"))?;
    let weights = component_weights(&dir, "diffusion_pytorch_model")?;
    UNet2DConditionModel::from_files(&config, &[weights], DType::F32, &Device::Cpu)
}

/// Reads a fixture adapter file (written by diffusers/peft or by hand in kohya layout) and
/// resolves its UNet part against `unet`.
fn read_adapter(cfg: &str, file: &str, unet: &UNet2DConditionModel) -> Result<Adapter> {
    let path = fixtures().join(cfg).join(file);
    let modules = ModelModules::unet_only(unet.lora_modules());
    AdapterFile::read(&path, &Device::Cpu)?
        .resolve(&modules)
        .with_context(|| format!("resolving {file}"))
}

fn unet_forward(
    unet: &UNet2DConditionModel,
    exp: &std::collections::HashMap<String, Tensor>,
) -> Result<Tensor> {
    unet.forward(
        get(exp, "sample"),
        get(exp, "timestep"),
        get(exp, "encoder_hidden_states"),
    )
}

#[test]
fn each_preset_matches_peft() -> Result<()> {
    for cfg in CONFIGS {
        let exp = expected(cfg)?;
        let mut unet = load_unet(cfg)?;
        let base = unet_forward(&unet, &exp)?;
        for preset in LoraTargets::ALL {
            let adapter = read_adapter(cfg, &format!("adapter_{preset}_peft.safetensors"), &unet)?;
            // The preset's module selection is the same as the one the reference adapted.
            let ours: BTreeSet<&str> = unet
                .lora_modules()
                .iter()
                .filter(|m| preset.matches(&m.path))
                .map(|m| m.path.as_str())
                .collect();
            let theirs: BTreeSet<&str> = adapter.unet.keys().map(String::as_str).collect();
            assert_eq!(
                ours, theirs,
                "{cfg}: preset {preset} selects different modules than the reference"
            );

            unet.attach_adapter("p", &adapter.unet, 1.0)?;
            let out = unet_forward(&unet, &exp)?;
            let reference = get(&exp, &format!("unet_out_lora_{preset}"));
            let err = max_abs_diff(&out, reference);
            let effect = max_abs_diff(reference, get(&exp, "unet_out"));
            println!(
                "{cfg} {preset}: {} modules, max err {err:.2e} (adapter effect {effect:.3})",
                theirs.len()
            );
            assert!(effect > 1e-2, "fixture adapter has no visible effect");
            assert!(
                err <= 1e-4,
                "{cfg} {preset}: LoRA forward differs from peft by {err}"
            );

            unet.detach_adapter("p")?;
            assert_eq!(
                max_abs_diff(&unet_forward(&unet, &exp)?, &base),
                0.0,
                "detach must restore the base"
            );
        }
    }
    Ok(())
}

#[test]
fn two_adapters_with_weights_match_peft() -> Result<()> {
    for cfg in CONFIGS {
        let exp = expected(cfg)?;
        let mut unet = load_unet(cfg)?;
        let a = read_adapter(cfg, "adapter_two_a_peft.safetensors", &unet)?;
        let b = read_adapter(cfg, "adapter_two_b_peft.safetensors", &unet)?;
        unet.attach_adapter("a", &a.unet, 0.5)?;
        unet.attach_adapter("b", &b.unet, 0.7)?;
        let err = max_abs_diff(&unet_forward(&unet, &exp)?, get(&exp, "unet_out_two"));
        println!("{cfg}: two adapters max err {err:.2e}");
        assert!(
            err <= 1e-4,
            "{cfg}: two adapters differ from peft set_adapters by {err}"
        );
    }
    Ok(())
}

#[test]
fn kohya_file_matches_diffusers_loader() -> Result<()> {
    for cfg in CONFIGS {
        let exp = expected(cfg)?;
        let mut unet = load_unet(cfg)?;
        let adapter = read_adapter(cfg, "adapter_kohya.safetensors", &unet)?;
        unet.attach_adapter("kohya", &adapter.unet, 1.0)?;
        let err = max_abs_diff(&unet_forward(&unet, &exp)?, get(&exp, "unet_out_kohya"));
        println!(
            "{cfg}: kohya adapter ({} UNet modules) max err {err:.2e}",
            adapter.unet.len()
        );
        assert!(
            err <= 1e-4,
            "{cfg}: kohya adapter differs from diffusers' load_lora_weights by {err}"
        );
    }
    Ok(())
}

#[test]
fn adapter_gradients_match_pytorch_autograd() -> Result<()> {
    check_adapter_gradients(
        &Device::Cpu,
        DType::F32,
        Tolerance::F32,
        Backward::Plain,
        GradReference::EveryLayer,
    )
}

/// Gradient checkpointing (`forward_checkpointed`, `--gradient-checkpointing`) recomputes each
/// layer in the backward pass: the same gradients, on both the CPU kernels' path (f32) and the
/// path other devices take (f16).
#[test]
fn checkpointed_adapter_gradients_match_pytorch_autograd() -> Result<()> {
    check_adapter_gradients(
        &Device::Cpu,
        DType::F32,
        Tolerance::F32,
        Backward::Checkpointed,
        GradReference::EveryLayer,
    )?;
    check_adapter_gradients(
        &Device::Cpu,
        DType::F16,
        Tolerance::F16,
        Backward::Checkpointed,
        GradReference::EveryLayer,
    )
}

/// The default preset, attn2 only: the other transformer layers are frozen, so the gradients
/// between adapters pass through the fused frozen nodes (`engine::fused`: a norm with its projection, an
/// output layer with its residual sum), which the every-layer fixture never reaches. Against
/// PyTorch on the attn2 part of the same adapter (`tests/reference/make_attn2_grad_fixtures.py`),
/// on the CPU kernels (f32) and the path other devices take (f16), plain and checkpointed.
#[test]
fn attn2_adapter_gradients_match_pytorch_autograd() -> Result<()> {
    for (dtype, tol) in [(DType::F32, Tolerance::F32), (DType::F16, Tolerance::F16)] {
        for backward in [Backward::Plain, Backward::Checkpointed] {
            check_adapter_gradients(&Device::Cpu, dtype, tol, backward, GradReference::Attn2)?;
        }
    }
    Ok(())
}

/// LoCon (`--conv-rank`): LoRA on every resnet and resampler 3×3 convolution, attached unmerged
/// to the runtime UNet (a down convolution with the layer's stride and padding, then a 1×1 up),
/// against peft's Conv2d LoRA under PyTorch autograd: the output and every adapter gradient, on
/// the CPU kernels (f32) and the path other devices take (f16), plain and checkpointed.
#[test]
fn conv_adapter_gradients_match_pytorch_autograd() -> Result<()> {
    for (dtype, tol) in [
        (DType::F32, Tolerance::F32),
        (DType::F16, Tolerance::F16_LOCON),
    ] {
        for backward in [Backward::Plain, Backward::Checkpointed] {
            check_adapter_gradients(&Device::Cpu, dtype, tol, backward, GradReference::Conv)?;
        }
    }
    Ok(())
}

/// DoRA (`--dora`): peft's weight-decomposed LoRA (`use_dora`) on every transformer layer and
/// resnet/resampler convolution, against PyTorch autograd: the output and every down, up and
/// magnitude gradient, on the CPU kernels (f32, plain and checkpointed) and the composed path
/// (f16).
#[test]
fn dora_adapter_gradients_match_pytorch_autograd() -> Result<()> {
    let runs = [
        (DType::F32, Tolerance::F32, Backward::Plain),
        (DType::F32, Tolerance::F32, Backward::Checkpointed),
        (DType::F16, Tolerance::F16_DORA, Backward::Plain),
    ];
    for (dtype, tol, backward) in runs {
        check_adapter_gradients(&Device::Cpu, dtype, tol, backward, GradReference::Dora)?;
    }
    Ok(())
}

/// LyCORIS' LoHa and LoKr (`--algo loha|lokr`) on every transformer layer and resnet/resampler
/// convolution, read from the files LyCORIS' kohya module saved, against lycoris-lora under
/// PyTorch autograd: the output and every factor's gradient (LoKr with low-rank and with whole
/// second halves), f32 plain and checkpointed.
#[test]
fn lycoris_adapter_gradients_match_lycoris_autograd() -> Result<()> {
    for algo in ["loha", "lokr", "lokr_full"] {
        for backward in [Backward::Plain, Backward::Checkpointed] {
            check_adapter_gradients(
                &Device::Cpu,
                DType::F32,
                Tolerance::F32,
                backward,
                GradReference::Lycoris(algo),
            )?;
        }
    }
    Ok(())
}

/// Our kohya writer gives back the files LyCORIS' kohya module saved: the same keys, shapes
/// (2-D factors, a whole `lokr_w2` of a convolution 4-D) and values, alpha included, under
/// LyCORIS' network module name.
#[test]
fn lycoris_adapters_write_back_as_lycoris_saved_them() -> Result<()> {
    use lora_toolkit::core::formats::adapter_file::{save_adapter, AdapterFormat, SaveOptions};
    use lora_toolkit::core::formats::kohya::BaseModelVersion;
    use lora_toolkit::core::models::config::PredictionType;
    let out = tempfile::tempdir()?;
    for cfg in CONFIGS {
        let unet = load_unet(cfg)?;
        for algo in ["loha", "lokr", "lokr_full"] {
            let adapter = lycoris_fixture_adapter(cfg, algo, &unet)?;
            let path = out.path().join(format!("{cfg}-{algo}.safetensors"));
            let adaptable = unet.adapter_modules();
            let modules = ModelModules::unet_only(&adaptable);
            let options = SaveOptions {
                format: AdapterFormat::Kohya,
                base_model: BaseModelVersion::SdV1,
                prediction: PredictionType::Epsilon,
                title: None,
                extra_metadata: Default::default(),
                lokr_factor: None,
            };
            save_adapter(&path, &adapter, &modules, &options)?;
            let ours = candle_core::safetensors::load(&path, &Device::Cpu)?;
            let reference = fixtures()
                .join(cfg)
                .join(format!("adapter_{algo}_kohya.safetensors"));
            let theirs = candle_core::safetensors::load(&reference, &Device::Cpu)?;
            let keys = |m: &std::collections::HashMap<String, Tensor>| {
                m.keys().cloned().collect::<BTreeSet<_>>()
            };
            assert!(!theirs.is_empty(), "{}: no tensor", reference.display());
            assert_eq!(keys(&ours), keys(&theirs), "{cfg} {algo}: keys");
            for (key, t) in &theirs {
                let o = &ours[key];
                assert_eq!(o.dims(), t.dims(), "{cfg} {algo}: `{key}` shape");
                assert_eq!(max_abs_diff(o, t), 0.0, "{cfg} {algo}: `{key}` values");
            }
            let metadata = lora_toolkit::core::io::read_safetensors(&path, &Device::Cpu)?.metadata;
            assert_eq!(metadata["ss_network_module"], "lycoris.kohya");
        }
    }
    Ok(())
}

/// The UNet adapter of LyCORIS' `adapter_<algo>_kohya.safetensors` (kohya names, LyCORIS'
/// factor names and shapes, alpha per module), keyed by the UNet's module paths.
fn lycoris_fixture_adapter(cfg: &str, algo: &str, unet: &UNet2DConditionModel) -> Result<Adapter> {
    use lora_toolkit::core::adapters::lycoris::{KronFactor, LycorisFactors, LycorisModule};
    let path = fixtures()
        .join(cfg)
        .join(format!("adapter_{algo}_kohya.safetensors"));
    let file = candle_core::safetensors::load(&path, &Device::Cpu)?;
    let mut adapter = Adapter::default();
    for info in unet.adapter_modules() {
        let name = format!("lora_unet_{}", info.path.replace('.', "_"));
        let factor = |which: &str| -> Option<Tensor> {
            let t = file.get(&format!("{name}.{which}"))?;
            let rows = t.dims()[0];
            t.reshape((rows, t.elem_count() / rows)).ok()
        };
        let Some(alpha) = file.get(&format!("{name}.alpha")) else {
            continue;
        };
        let alpha = alpha.to_scalar::<f32>()? as f64;
        let kron = |whole: &str, a: &str, b: &str| -> Result<KronFactor> {
            Ok(match (factor(whole), factor(a), factor(b)) {
                (Some(w), None, None) => KronFactor::Full(w),
                (None, Some(a), Some(b)) => KronFactor::LowRank { a, b },
                _ => anyhow::bail!("{name}: incomplete LoKr half {whole}"),
            })
        };
        let factors = match factor("hada_w1_a") {
            Some(w1a) => LycorisFactors::LoHa {
                w1a,
                w1b: factor("hada_w1_b").context("hada_w1_b")?,
                w2a: factor("hada_w2_a").context("hada_w2_a")?,
                w2b: factor("hada_w2_b").context("hada_w2_b")?,
            },
            None => LycorisFactors::LoKr {
                w1: kron("lokr_w1", "lokr_w1_a", "lokr_w1_b")?,
                w2: kron("lokr_w2", "lokr_w2_a", "lokr_w2_b")?,
            },
        };
        let module = LycorisModule { factors, alpha };
        adapter
            .unet
            .insert(info.path.clone(), AdapterModule::Lycoris(module));
    }
    anyhow::ensure!(!adapter.unet.is_empty(), "{}: no module", path.display());
    Ok(adapter)
}

/// A half-precision base takes the path every device but the CPU in f32 takes (candle's ops, the frozen
/// layers' outputs re-attached with their input gradients): the same check on the CPU.
#[test]
fn adapter_gradients_with_an_f16_base_match_pytorch_autograd() -> Result<()> {
    check_adapter_gradients(
        &Device::Cpu,
        DType::F16,
        Tolerance::F16,
        Backward::Plain,
        GradReference::EveryLayer,
    )
}

/// The CUDA path (cuBLAS, candle's kernels, the composed ops that stand in for the CPU kernels)
/// against the same PyTorch reference: f32 as tight as on the CPU, a bf16 base (f32 adapters,
/// as the trainer runs it) within bf16's rounding. Runs where the `cuda` feature is built and a
/// GPU is present (`benches/gpu.sh`).
#[cfg(feature = "cuda")]
#[test]
fn adapter_gradients_match_pytorch_autograd_on_cuda() -> Result<()> {
    let device = Device::new_cuda(0)?;
    let runs = [
        (DType::F32, Backward::Plain, GradReference::EveryLayer),
        (DType::BF16, Backward::Plain, GradReference::EveryLayer),
        (
            DType::BF16,
            Backward::Checkpointed,
            GradReference::EveryLayer,
        ),
        (DType::F32, Backward::Plain, GradReference::Attn2),
        (DType::BF16, Backward::Plain, GradReference::Attn2),
        (DType::F32, Backward::Plain, GradReference::Dora),
        (DType::BF16, Backward::Plain, GradReference::Dora),
    ];
    for (dtype, backward, reference) in runs {
        let tol = match (dtype, reference) {
            (DType::F32, _) => Tolerance::F32,
            (_, GradReference::Conv) => Tolerance::BF16_LOCON,
            (_, GradReference::Dora) => Tolerance::BF16_DORA,
            _ => Tolerance::BF16,
        };
        check_adapter_gradients(&device, dtype, tol, backward, reference)?;
    }
    Ok(())
}

/// How the gradients are taken: candle's backward over the whole forward pass, or gradient
/// checkpointing's layer-by-layer recomputation.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Backward {
    Plain,
    Checkpointed,
}

/// Which PyTorch gradient reference a check compares with.
#[derive(Debug, Clone, Copy)]
enum GradReference {
    /// `adapter_grad_peft.safetensors` on every transformer layer (`attn-mlp`), against
    /// `expected.safetensors`.
    EveryLayer,
    /// That adapter's attn2 modules only, against `grad_attn2.safetensors`.
    Attn2,
    /// LoRA on every 3×3 convolution of the resnets and resamplers (LoCon,
    /// `make_conv_grad_fixtures.py`), against `grad_conv.safetensors`.
    Conv,
    /// DoRA on every transformer layer and resnet/resampler convolution
    /// (`make_dora_grad_fixtures.py`: `adapter_dora_peft.safetensors` read as diffusers wrote
    /// it), against `grad_dora.safetensors`: down, up and magnitude gradients.
    Dora,
    /// LyCORIS' LoHa or LoKr modules (`loha`, `lokr`, `lokr_full`) on the same layers
    /// (`make_lycoris_grad_fixtures.py`: `adapter_<algo>_kohya.safetensors` as LyCORIS saved
    /// it), against `grad_<algo>.safetensors`: every factor's gradient.
    Lycoris(&'static str),
}

/// Bounds on the relative error (‖ours − reference‖ / ‖reference‖) of the UNet output and of the
/// adapter gradients (their median and the worst one) against PyTorch's f32 reference.
#[derive(Clone, Copy)]
struct Tolerance {
    forward: f32,
    gradient_median: f32,
    gradient_worst: f32,
}

impl Tolerance {
    const F32: Self = Self {
        forward: 1e-5,
        gradient_median: 1e-4,
        gradient_worst: 1e-3,
    };
    /// Half precision rounds every op; the bounds are about twice PyTorch's own error on these
    /// fixtures with the same base dtype (`tests/reference/half_precision_error.py`: f16 forward
    /// 1.4e-3–2.1e-3, gradient median 4.7e-3–5.2e-3, worst 2.7e-2–7.5e-2; bf16 forward
    /// 1.1e-2–1.8e-2, median 3.2e-2, worst 9.6e-2–1.0e-1).
    const F16: Self = Self {
        forward: 5e-3,
        gradient_median: 1e-2,
        gradient_worst: 0.15,
    };
    /// LoCon's gradients run through more half-precision sums (over every position, for the
    /// time embedding's projection): PyTorch's own f16 error there
    /// (`half_precision_error.py`, LoCon) is forward 2.3e-3–2.5e-3, gradient median
    /// 1.2e-2–1.9e-2, worst 4.1e-2–5.7e-2; bf16 forward 2.0e-2, median 2.4e-2–3.3e-2, worst
    /// 6.5e-2–8.1e-2. Again about twice that.
    const F16_LOCON: Self = Self {
        forward: 5e-3,
        gradient_median: 4e-2,
        gradient_worst: 0.15,
    };
    /// DoRA's large fixture adapter (every module's weight changed by tens of percent) makes
    /// half precision rougher still: PyTorch's own f16 error there (`half_precision_error.py`,
    /// DoRA) is forward 3.2e-3–3.6e-3, gradient median 1.8e-2–4.9e-2, worst 0.24–0.64 (the
    /// small attn1 key projections' gradients). About twice that, the worst bound below
    /// PyTorch's own worst.
    const F16_DORA: Self = Self {
        forward: 8e-3,
        gradient_median: 0.1,
        gradient_worst: 0.5,
    };
    /// PyTorch's own bf16 DoRA error (`half_precision_error.py`): forward 2.8e-2–3.2e-2,
    /// gradient median 4.0e-2–4.6e-2, worst 0.12–0.19; about twice that.
    #[cfg(feature = "cuda")]
    const BF16_DORA: Self = Self {
        forward: 6e-2,
        gradient_median: 0.1,
        gradient_worst: 0.4,
    };
    #[cfg(feature = "cuda")]
    const BF16_LOCON: Self = Self {
        forward: 4e-2,
        gradient_median: 7e-2,
        gradient_worst: 0.2,
    };
    #[cfg(feature = "cuda")]
    const BF16: Self = Self {
        forward: 4e-2,
        gradient_median: 6e-2,
        gradient_worst: 0.2,
    };
}

/// Whether an error is within its bound; false for NaN, which `err > tol` would let pass.
fn within(err: f32, tol: f32) -> bool {
    err <= tol
}

/// Loads each tiny model on `device` with a `dtype` base, attaches the fixture adapter as f32
/// trainable variables, and compares output, loss and every adapter gradient with PyTorch's.
fn check_adapter_gradients(
    device: &Device,
    dtype: DType,
    tol: Tolerance,
    backward: Backward,
    reference: GradReference,
) -> Result<()> {
    let mut failures = Vec::new();
    for cfg in CONFIGS {
        let mut exp = expected(cfg)?;
        let count_grads = |m: &std::collections::HashMap<String, candle_core::Tensor>| {
            m.keys().filter(|k| k.starts_with("grad.")).count()
        };
        let mut reference_grads = count_grads(&exp);
        let dir = fixtures().join(cfg).join("unet");
        let config = UNetConfig::from_file(&dir.join("config.json"))?;
        let weights = component_weights(&dir, "diffusion_pytorch_model")?;
        let mut unet = UNet2DConditionModel::from_files(&config, &[weights], dtype, device)?;
        let mut adapter = match reference {
            GradReference::Conv => Adapter::default(),
            GradReference::Lycoris(algo) => lycoris_fixture_adapter(cfg, algo, &unet)?,
            GradReference::Dora => {
                let path = fixtures().join(cfg).join("adapter_dora_peft.safetensors");
                let adaptable = unet.adapter_modules();
                let modules = ModelModules::unet_only(&adaptable);
                AdapterFile::read(&path, &Device::Cpu)?.resolve(&modules)?
            }
            _ => read_adapter(cfg, "adapter_grad_peft.safetensors", &unet)?,
        };
        if let GradReference::Lycoris(algo) = reference {
            let path = fixtures()
                .join(cfg)
                .join(format!("grad_{algo}.safetensors"));
            let fixture = candle_core::safetensors::load(&path, &Device::Cpu)
                .with_context(|| format!("loading {}", path.display()))?;
            reference_grads = count_grads(&fixture);
            exp.insert(
                "unet_out_lora_grad".into(),
                get(&fixture, &format!("{algo}_out")).clone(),
            );
            let loss = get(&fixture, &format!("{algo}_loss")).clone();
            exp.insert("grad_loss".into(), loss);
            exp.extend(fixture.into_iter().filter(|(k, _)| k.starts_with("grad.")));
        }
        if let GradReference::Dora = reference {
            let path = fixtures().join(cfg).join("grad_dora.safetensors");
            let dora = candle_core::safetensors::load(&path, &Device::Cpu)
                .with_context(|| format!("loading {}", path.display()))?;
            reference_grads = count_grads(&dora);
            exp.insert("unet_out_lora_grad".into(), get(&dora, "dora_out").clone());
            exp.insert("grad_loss".into(), get(&dora, "dora_loss").clone());
            exp.extend(dora.into_iter().filter(|(k, _)| k.starts_with("grad.")));
        }
        if let GradReference::Conv = reference {
            let path = fixtures().join(cfg).join("grad_conv.safetensors");
            let conv = candle_core::safetensors::load(&path, &Device::Cpu)
                .with_context(|| format!("loading {}", path.display()))?;
            // peft's Conv2d LoRA: A `[r, in, 3, 3]`, B `[out, r, 1, 1]`, alpha 8.
            for (key, a) in conv
                .iter()
                .filter(|(k, _)| k.starts_with("unet.") && k.ends_with(".lora_A.weight"))
            {
                let path = key
                    .strip_prefix("unet.")
                    .and_then(|k| k.strip_suffix(".lora_A.weight"))
                    .context("conv fixture key")?;
                let b = get(&conv, &format!("unet.{path}.lora_B.weight"));
                let module = LoraModule {
                    down: a.flatten_from(1)?,
                    up: b.flatten_from(1)?,
                    alpha: 8.0,
                    magnitude: None,
                };
                adapter.unet.insert(path.to_string(), module.into());
            }
            reference_grads = count_grads(&conv);
            exp.insert(
                "unet_out_lora_grad".into(),
                get(&conv, "conv_lora_out").clone(),
            );
            exp.insert("grad_loss".into(), get(&conv, "conv_lora_loss").clone());
            exp.extend(conv.into_iter().filter(|(k, _)| k.starts_with("grad.")));
        }
        if let GradReference::Attn2 = reference {
            adapter
                .unet
                .retain(|path, _| LoraTargets::Attn2.matches(path));
            let path = fixtures().join(cfg).join("grad_attn2.safetensors");
            let attn2 = candle_core::safetensors::load(&path, &Device::Cpu)
                .with_context(|| format!("loading {}", path.display()))?;
            reference_grads = count_grads(&attn2);
            exp.extend(attn2);
        }

        // Make every down/up (and DoRA magnitude) a trainable f32 variable on `device`, named
        // by the reference's gradient key.
        let mut vars: Vec<(String, Var)> = Vec::new();
        let mut trainable = BTreeMap::new();
        for (path, m) in &adapter.unet {
            let mut var = |t: &Tensor, which: &str| -> Result<Tensor> {
                let v = Var::from_tensor(&t.to_device(device)?)?;
                vars.push((format!("grad.{path}.{which}"), v.clone()));
                Ok(v.as_tensor().clone())
            };
            let module = match m {
                AdapterModule::Lora(m) => AdapterModule::Lora(LoraModule {
                    down: var(&m.down, "lora_A.weight")?,
                    up: var(&m.up, "lora_B.weight")?,
                    alpha: m.alpha,
                    magnitude: m
                        .magnitude
                        .as_ref()
                        .map(|t| var(t, "lora_magnitude_vector"))
                        .transpose()?,
                }),
                AdapterModule::Lycoris(m) => {
                    let mut trained = m.clone();
                    for (name, t) in m.named_tensors() {
                        // LyCORIS' conv factors are stored like the fixture's parameters.
                        let tensor = var(t, name)?;
                        *trained.tensor_mut(name).context("factor")? = tensor;
                    }
                    AdapterModule::Lycoris(trained)
                }
            };
            trainable.insert(path.clone(), module);
        }
        unet.attach_adapter("grad", &trainable, 1.0)?;

        let input = |key: &str| get(&exp, key).to_device(device)?.to_dtype(dtype);
        let timestep = get(&exp, "timestep").to_device(device)?;
        let (sample, context) = (input("sample")?, input("encoder_hidden_states")?);
        let (out, checkpointed) = match backward {
            Backward::Plain => (unet.forward(&sample, &timestep, &context)?, None),
            Backward::Checkpointed => {
                let (prediction, pass) = unet.forward_checkpointed(&sample, &timestep, &context)?;
                (prediction, Some(pass))
            }
        };
        let out_f32 = out.to_dtype(DType::F32)?;
        let label = format!(
            "{cfg} on {device:?} with a {dtype:?} base ({backward:?} backward, {reference:?} \
             adapter)"
        );
        let forward_err = rel_err(
            &out_f32.to_device(&Device::Cpu)?,
            get(&exp, "unet_out_lora_grad"),
        );
        if !within(forward_err, tol.forward) {
            failures.push(format!("{label}: forward relative error {forward_err:.2e}"));
        }
        let target = get(&exp, "grad_target").to_device(device)?;
        let loss = (out_f32 - target)?.sqr()?.mean_all()?;
        let ref_loss = get(&exp, "grad_loss")
            .flatten_all()?
            .get(0)?
            .to_scalar::<f32>()?;
        let our_loss = loss.to_device(&Device::Cpu)?.to_scalar::<f32>()?;
        let loss_err = (our_loss - ref_loss).abs() / ref_loss.abs().max(1.0);
        if !within(loss_err, tol.forward) {
            failures.push(format!("{label}: loss {our_loss} vs {ref_loss}"));
        }

        let grads = match checkpointed {
            None => loss.backward()?,
            Some(pass) => {
                let params: Vec<Var> = vars.iter().map(|(_, v)| v.clone()).collect();
                pass.backward(&loss, &params)?
            }
        };
        let mut errors = Vec::new();
        let mut worst = (0f32, String::new());
        for (key, var) in &vars {
            let grad = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{label}: adapter parameter {key} got no gradient"));
            let reference = get(&exp, key).reshape(var.as_tensor().shape())?;
            assert!(
                max_abs(&reference) > 0.0,
                "{cfg}: reference gradient {key} is zero"
            );
            let err = rel_err(&grad.to_device(&Device::Cpu)?, &reference);
            if err > worst.0 {
                worst = (err, key.clone());
            }
            errors.push(err);
        }
        // Every reference gradient is compared: none is skipped by a module the adapter lacks.
        assert_eq!(
            errors.len(),
            reference_grads,
            "{label}: compared {} adapter gradients, the fixture holds {reference_grads}",
            errors.len()
        );
        errors.sort_by(f32::total_cmp);
        let median = errors[errors.len() / 2];
        if !(within(median, tol.gradient_median) && within(worst.0, tol.gradient_worst)) {
            failures.push(format!(
                "{label}: gradient relative errors: median {median:.2e}, worst {:.2e} ({})",
                worst.0, worst.1
            ));
        }
        println!(
            "{label}: forward relative error {forward_err:.2e}, {} parameters, relative gradient \
             error median {median:.2e}, worst {:.2e} ({})",
            errors.len(),
            worst.0,
            worst.1
        );
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

#[test]
fn module_list_without_weights_matches_the_loaded_unet() -> Result<()> {
    for cfg in CONFIGS {
        let unet = load_unet(cfg)?;
        let from_config = UNet2DConditionModel::adapter_modules_of(unet.config())?;
        assert_eq!(from_config, unet.adapter_modules(), "{cfg}");
        assert!(
            unet.resnet_modules().len() > 4
                && from_config.len() == unet.lora_modules().len() + unet.resnet_modules().len(),
            "{cfg}"
        );
    }
    Ok(())
}
