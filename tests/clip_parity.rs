//! CLIP model and CLIP score parity with transformers' `CLIPModel` / `CLIPProcessor` and
//! torchmetrics' `CLIPScore` on `tests/fixtures/clip-tiny` (made by
//! `tests/reference/make_clip_fixtures.py`), and the errors for broken CLIP folders.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use common::{expected, fixtures, get, max_abs_diff, rel_err};
use image::RgbImage;
use lora_toolkit::core::models::clip::{ClipModel, TextPooling};
use lora_toolkit::core::models::tokenizer::TokenizedPrompt;
use lora_toolkit::eval::clip_score::{clip_score, clip_scores, ClipScoreModel};
use lora_toolkit::eval::images::read_rgb;

const FIXTURE: &str = "clip-tiny";
/// Features in f32 against PyTorch's f32, relative (Frobenius) error.
const FEATURE_TOLERANCE: f32 = 1e-4;
/// The CLIP score against torchmetrics', relative.
const SCORE_TOLERANCE: f32 = 1e-3;

fn folder() -> PathBuf {
    fixtures().join(FIXTURE)
}

/// What the fixture script recorded besides tensors: image files and prompts, in order.
struct Meta {
    images: Vec<String>,
    prompts: Vec<String>,
    long_prompt: String,
}

fn meta() -> Result<Meta> {
    let path = folder().join("expected.json");
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    let field = |key: &str| -> Result<serde_json::Value> {
        json.get(key)
            .cloned()
            .with_context(|| format!("{}: no `{key}`", path.display()))
    };
    Ok(Meta {
        images: serde_json::from_value(field("images")?)?,
        prompts: serde_json::from_value(field("prompts")?)?,
        long_prompt: serde_json::from_value(field("long_prompt")?)?,
    })
}

/// The fixture images, decoded as lora-eval reads a user's files (JPEGs by libjpeg-turbo, as PIL).
fn images(meta: &Meta) -> Result<Vec<RgbImage>> {
    meta.images
        .iter()
        .map(|name| read_rgb(&folder().join("images").join(name)))
        .collect()
}

fn load_model(dir: &Path) -> Result<ClipModel> {
    ClipModel::load(dir, DType::F32, &Device::Cpu)
}

#[track_caller]
fn assert_close(ours: &Tensor, reference: &Tensor, tolerance: f32, what: &str) {
    let err = rel_err(ours, reference);
    println!(
        "{what}: relative error {err:.3e}, max |ours - reference| {:.3e}",
        max_abs_diff(ours, reference)
    );
    assert!(err <= tolerance, "{what}: relative error {err:.3e}");
}

#[test]
fn features_match_transformers() -> Result<()> {
    let exp = expected(FIXTURE)?;
    let model = load_model(&folder())?;
    assert!(matches!(
        model.text_pooling(),
        TextPooling::FirstEndToken(_)
    ));

    let image = model.image_features(get(&exp, "pixel_values"))?;
    assert_close(
        &image,
        get(&exp, "image_features"),
        FEATURE_TOLERANCE,
        "image features",
    );
    let text = model.text_features(get(&exp, "text_input_ids"))?;
    assert_close(
        &text,
        get(&exp, "text_features"),
        FEATURE_TOLERANCE,
        "text features",
    );
    let raw = model.text_features(get(&exp, "raw_input_ids"))?;
    assert_close(
        &raw,
        get(&exp, "raw_text_features"),
        FEATURE_TOLERANCE,
        "raw-id features",
    );
    Ok(())
}

/// With a legacy `eos_token_id: 2`, transformers pools at the highest id; the fixture's raw ids put
/// an id above the end token before it, where the two rules part.
#[test]
fn legacy_eos_token_id_pools_at_the_highest_id() -> Result<()> {
    let exp = expected(FIXTURE)?;
    let dir = tempfile::tempdir()?;
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(folder().join("config.json"))?)?;
    config["text_config"]["eos_token_id"] = 2.into();
    std::fs::write(dir.path().join("config.json"), config.to_string())?;
    std::fs::copy(
        folder().join("model.safetensors"),
        dir.path().join("model.safetensors"),
    )?;
    let model = load_model(dir.path())?;
    assert_eq!(model.text_pooling(), TextPooling::HighestId);
    let raw = model.text_features(get(&exp, "raw_input_ids"))?;
    assert_close(
        &raw,
        get(&exp, "raw_text_features_legacy"),
        FEATURE_TOLERANCE,
        "raw-id features, legacy pooling",
    );
    let current = get(&exp, "raw_text_features");
    assert!(
        rel_err(&raw, current) > 100.0 * FEATURE_TOLERANCE,
        "the fixture must tell the two pooling rules apart"
    );
    Ok(())
}

#[test]
fn tokenizer_and_preprocessing_match_clip_processor() -> Result<()> {
    let exp = expected(FIXTURE)?;
    let meta = meta()?;
    let scorer = ClipScoreModel::load(&folder(), DType::F32, &Device::Cpu)?;
    assert_eq!(
        scorer.model().text_pooling(),
        TextPooling::FirstEndToken(scorer.tokenizer().eos_id())
    );

    let mut prompts = meta.prompts.clone();
    prompts.push(meta.long_prompt.clone());
    let encoded: Vec<TokenizedPrompt> = prompts
        .iter()
        .map(|p| scorer.tokenizer().encode(p))
        .collect();
    assert_eq!(
        encoded.iter().map(|p| p.truncated).collect::<Vec<_>>(),
        [false, false, false, false, false, true]
    );
    let ids = TokenizedPrompt::batch_tensor(&encoded, &Device::Cpu)?;
    assert_eq!(
        ids.to_vec2::<u32>()?,
        get(&exp, "text_input_ids")
            .to_dtype(DType::U32)?
            .to_vec2::<u32>()?
    );

    let pixels = scorer
        .preprocessor()
        .pixel_values(&images(&meta)?, &Device::Cpu)?;
    let reference = get(&exp, "pixel_values");
    // One uint8 level in normalised units, for the channel with the smallest std.
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        folder().join("preprocessor_config.json"),
    )?)?;
    let smallest_std = config["image_std"]
        .as_array()
        .context("image_std")?
        .iter()
        .filter_map(serde_json::Value::as_f64)
        .fold(f64::INFINITY, f64::min);
    let level = (1.0 / (255.0 * smallest_std)) as f32;
    for (i, name) in meta.images.iter().enumerate() {
        let (ours, theirs) = (pixels.get(i)?, reference.get(i)?);
        let diff = max_abs_diff(&ours, &theirs);
        let differing = ours
            .ne(&theirs)?
            .to_dtype(DType::F32)?
            .sum_all()?
            .to_scalar::<f32>()?;
        println!(
            "{name}: max |ours - CLIPImageProcessor| = {diff:.3e} ({:.1} levels), {differing} of {} values differ",
            diff / level,
            ours.elem_count()
        );
        // The same pixels (PNG, and JPEG through libjpeg-turbo as in PIL), the same uint8
        // arithmetic and f32 normalisation: equal.
        assert_eq!(diff, 0.0, "{name}");
    }
    Ok(())
}

#[test]
fn clip_score_matches_torchmetrics() -> Result<()> {
    let exp = expected(FIXTURE)?;
    let meta = meta()?;
    let scorer = ClipScoreModel::load(&folder(), DType::F32, &Device::Cpu)?;
    let images = images(&meta)?;

    // From the files, through the whole chain.
    let features = scorer.image_features(&images)?;
    assert_close(
        &features,
        get(&exp, "image_features"),
        SCORE_TOLERANCE,
        "image features from the files",
    );

    let per_pair = clip_scores(&scorer, &images, &meta.prompts)?;
    let per_pair = Tensor::new(per_pair.as_slice(), &Device::Cpu)?;
    assert_close(
        &per_pair,
        get(&exp, "clip_score_per_pair"),
        SCORE_TOLERANCE,
        "per-pair scores",
    );
    let mean = per_pair.mean_all()?.reshape(1)?;
    assert_close(
        &mean,
        get(&exp, "clip_score_mean"),
        SCORE_TOLERANCE,
        "mean before the clamp",
    );
    let score = clip_score(&scorer, &images, &meta.prompts)?;
    assert!(
        score > 1.0,
        "the fixture's score must be clearly positive: {score}"
    );
    assert_close(
        &Tensor::new(&[score], &Device::Cpu)?,
        get(&exp, "clip_score"),
        SCORE_TOLERANCE,
        "CLIP score",
    );

    let err = clip_score(&scorer, &images[..2], &meta.prompts).unwrap_err();
    let expected_msg = format!("2 images but {} prompts", meta.prompts.len());
    assert!(format!("{err:#}").contains(&expected_msg), "{err:#}");
    Ok(())
}

/// A copy of the fixture folder with `edit` applied to its weights.
fn folder_with_weights(
    edit: impl FnOnce(&mut HashMap<String, Tensor>),
) -> Result<tempfile::TempDir> {
    let dir = tempfile::tempdir()?;
    for name in [
        "config.json",
        "preprocessor_config.json",
        "vocab.json",
        "merges.txt",
        "special_tokens_map.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(folder().join(name), dir.path().join(name))?;
    }
    let mut weights =
        candle_core::safetensors::load(folder().join("model.safetensors"), &Device::Cpu)?;
    edit(&mut weights);
    candle_core::safetensors::save(&weights, dir.path().join("model.safetensors"))?;
    Ok(dir)
}

fn err_text<T>(r: Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn broken_clip_folders_name_the_file_and_key() -> Result<()> {
    let empty = tempfile::tempdir()?;
    let msg = err_text(load_model(empty.path()));
    assert!(msg.contains("config.json"), "{msg}");

    let missing = folder_with_weights(|w| {
        w.remove("vision_model.post_layernorm.bias");
    })?;
    let msg = err_text(load_model(missing.path()));
    assert!(
        msg.contains("model.safetensors") && msg.contains("`vision_model.post_layernorm.bias`"),
        "{msg}"
    );

    let key = "text_projection.weight";
    let reshaped = folder_with_weights(|w| {
        let t = w[key].t().unwrap().contiguous().unwrap();
        w.insert(key.to_owned(), t);
    })?;
    let msg = err_text(load_model(reshaped.path()));
    assert!(
        msg.contains("model.safetensors") && msg.contains(&format!("`{key}` has shape [32, 16]")),
        "{msg}"
    );

    // The whole scorer: a crop that does not fit the model is refused at load.
    let dir = folder_with_weights(|_| {})?;
    let config = dir.path().join("preprocessor_config.json");
    let text = std::fs::read_to_string(&config)?.replace("\"crop_size\": 32", "\"crop_size\": 24");
    std::fs::write(&config, text)?;
    let msg = err_text(ClipScoreModel::load(dir.path(), DType::F32, &Device::Cpu));
    assert!(
        msg.contains("preprocessor_config.json") && msg.contains("image_size 32"),
        "{msg}"
    );
    Ok(())
}
