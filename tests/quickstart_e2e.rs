//! End to end on the embedded default model (`models/shapes-tiny`): the quick start's adapter,
//! trained with the default recipe, teaches the model the concept `sks` (magenta, never seen by
//! the base) while prompts without `sks` barely move; and the adapter merged into the base by
//! lora-merge generates the same pictures as the adapter applied unmerged.
mod common;

use candle_core::{DType, Device};
use lora_toolkit::core::options::AdapterSpec;
use lora_toolkit::core::options::Precision;
use lora_toolkit::core::source::ModelFolder;
use lora_toolkit::default_model::default_model_dir;
use lora_toolkit::infer::Pipeline;
use lora_toolkit::merge::{merge, MergeOptions};
use lora_toolkit::quickstart::{self, Options, CONCEPT_PROMPTS, UNRELATED_PROMPTS};

#[test]
fn adapter_learns_the_concept_and_merging_it_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let options = Options {
        output: dir.path().join("quickstart"),
        // The default training recipe; fewer denoising steps than the quick start's pictures
        // (25) to keep the test short.
        sample_steps: 15,
        ..Options::default()
    };
    let report = quickstart::run(&options, &mut |_| {}).unwrap();
    for name in [&report.adapter, &report.grid, &report.loss_curve] {
        assert!(name.is_file(), "{} was not written", name.display());
    }
    // The loss on the training images at fixed noise, before training and five times during
    // it, falls: the curve the quick start draws over the scattered per-step losses.
    let fixed: Vec<(usize, f64)> = report
        .fixed_noise_loss
        .iter()
        .map(|p| (p.step, p.loss))
        .collect();
    assert_eq!(fixed.len(), 6, "{fixed:?}");
    assert_eq!(fixed[0].0, 0);
    assert!(
        fixed.iter().all(|p| p.1.is_finite()) && fixed[5].1 < fixed[0].1,
        "the fixed-noise loss did not fall: {fixed:?}"
    );
    // Every caption of the grammar, two seeds each, read back from the base model's pictures
    // (the quick start's guidance 1, the 15 steps used here): the committed model drew the asked
    // colour and background in all 48, the asked shape in 43 and crisp edges in 47. The floors
    // are issue 25's goal for colour, one picture under its background goal (0.98 of 48 would
    // be all of them), and a few pictures' margin for shape and edges.
    let following = report.default_model_following;
    eprintln!("{following:?}");
    assert_eq!(following.pictures, 48, "{following:?}");
    assert!(
        following.colour >= 0.95
            && following.background >= 0.97
            && following.shape >= 0.8
            && following.crisp >= 0.9,
        "the default model no longer follows its captions: {following:?}"
    );
    let summary = format!("{:#?}", report.prompts);
    eprintln!("{summary}");
    let concept_prompts = report.prompts.iter().filter(|p| p.mentions_concept).count();
    assert_eq!(
        (concept_prompts, report.prompts.len() - concept_prompts),
        (CONCEPT_PROMPTS.len(), UNRELATED_PROMPTS.len()),
        "{summary}"
    );
    // Every concept prompt turns magenta (the base draws none: its scores are the faint colour
    // fringes of anti-aliased edges), by issue 25's bound: at least 0.03 and 5× its base score.
    // Measured here: 0.0002–0.0010 -> 0.043 (the triangle on black, the smallest shape) to 0.198.
    for p in report.prompts.iter().filter(|p| p.mentions_concept) {
        assert!(
            p.adapter_concept_score >= 0.03
                && p.adapter_concept_score >= 5.0 * p.base_concept_score,
            "`{}`: magenta score {:.4} -> {:.4}\n{summary}",
            p.prompt,
            p.base_concept_score,
            p.adapter_concept_score
        );
    }
    // Prompts without `sks` do not turn magenta: at most 0.005 above their base score (issue
    // 25's bound; measured: at most 0.001 above, for seeds 0–2).
    for p in report.prompts.iter().filter(|p| !p.mentions_concept) {
        assert!(
            p.adapter_concept_score <= p.base_concept_score + 0.005,
            "`{}` turned magenta\n{summary}",
            p.prompt
        );
    }
    // And they change less: measured 6.3/255 without `sks` against 27.7/255 with it.
    let mean = |concept: bool, f: &dyn Fn(&quickstart::PromptResult) -> f64| {
        let picked: Vec<f64> = report
            .prompts
            .iter()
            .filter(|p| p.mentions_concept == concept)
            .map(f)
            .collect();
        picked.iter().sum::<f64>() / picked.len() as f64
    };
    let concept_change = mean(true, &|p| p.mean_pixel_change);
    let unrelated_change = mean(false, &|p| p.mean_pixel_change);
    assert!(
        unrelated_change < 0.5 * concept_change,
        "prompts without `sks` changed {unrelated_change:.1}/255, with it {concept_change:.1}/255\n{summary}"
    );

    // Merged (f32, so only summation order differs) vs unmerged.
    let merged_dir = dir.path().join("merged");
    merge(&MergeOptions {
        base: default_model_dir(),
        adapters: vec![AdapterSpec {
            path: report.adapter.clone(),
            scale: 1.0,
        }],
        output: merged_dir.clone(),
        dtype: Some(Precision::F32),
        allow_unmatched: false,
        allow_nonfinite: false,
    })
    .unwrap();
    let device = Device::Cpu;
    let merged = Pipeline::load(
        &ModelFolder::open(&merged_dir).unwrap(),
        &[],
        &device,
        DType::F32,
        false,
    )
    .unwrap();
    let unmerged = Pipeline::load(
        &ModelFolder::open(&default_model_dir()).unwrap(),
        &[AdapterSpec::new(&report.adapter, 1.0)],
        &device,
        DType::F32,
        false,
    )
    .unwrap();
    for prompt in [CONCEPT_PROMPTS[0], UNRELATED_PROMPTS[0]] {
        let (merged_images, merged_pixels) =
            quickstart::generate(&merged, prompt, &options).unwrap();
        let (unmerged_images, unmerged_pixels) =
            quickstart::generate(&unmerged, prompt, &options).unwrap();
        let diff = common::max_abs_diff(&merged_pixels, &unmerged_pixels);
        assert!(
            diff < 1e-3,
            "`{prompt}`: merged vs unmerged differ by {diff}"
        );
        for (a, b) in merged_images.iter().zip(&unmerged_images) {
            let worst = a
                .pixels
                .iter()
                .zip(&b.pixels)
                .map(|(x, y)| x.abs_diff(*y))
                .max()
                .unwrap();
            assert!(worst <= 1, "`{prompt}`: 8-bit pictures differ by {worst}");
        }
    }
}

#[test]
fn quick_start_refuses_a_folder_it_did_not_make() {
    let dir = tempfile::tempdir().unwrap();
    let mine = dir.path().join("notes.txt");
    std::fs::write(&mine, "keep me").unwrap();
    let options = Options {
        output: dir.path().to_path_buf(),
        ..Options::default()
    };
    let err = quickstart::run(&options, &mut |_| {}).unwrap_err();
    assert!(
        format!("{err:#}").contains("was not made by the quick start"),
        "{err:#}"
    );
    assert_eq!(std::fs::read_to_string(&mine).unwrap(), "keep me");
}

/// The recipe that made `models/shapes-tiny` is deterministic: two short runs from the same seed
/// write byte-identical weights (so rerunning the full recipe reproduces the committed model).
#[test]
fn default_model_recipe_is_reproducible() {
    use lora_toolkit::default_model::{build, Recipe};
    let dir = tempfile::tempdir().unwrap();
    let recipe = Recipe {
        steps: 3,
        warmup_steps: 1,
        batch_size: 2,
        ..Recipe::default()
    };
    let mut weights = Vec::new();
    for run in ["a", "b"] {
        let out = dir.path().join(run);
        build(&out, &recipe, &Device::Cpu, 0, &mut |_| {}).unwrap();
        let unet = std::fs::read(out.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
        let te = std::fs::read(out.join("text_encoder/model.safetensors")).unwrap();
        weights.push((unet, te));
    }
    assert!(weights[0] == weights[1], "two runs of the recipe differ");
    // The committed model's text encoder is the recipe's (it is not trained, so any run has it).
    let committed = std::fs::read(default_model_dir().join("text_encoder/model.safetensors"));
    assert!(
        committed.unwrap() == weights[0].1,
        "models/shapes-tiny has another text encoder"
    );
    // An existing folder is never overwritten.
    let err = build(&dir.path().join("a"), &recipe, &Device::Cpu, 0, &mut |_| {}).unwrap_err();
    assert!(format!("{err:#}").contains("already exists"), "{err:#}");
}
