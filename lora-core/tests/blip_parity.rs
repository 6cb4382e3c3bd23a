//! BLIP captioning parity with transformers' `BlipForConditionalGeneration` on
//! `tests/fixtures/blip-tiny` (made by `tests/reference/make_blip_fixtures.py`): the image
//! features, the decoder logits for a prefix, and greedy decoding's token ids, with and without a
//! prompt, all from the pixel values transformers' processor made.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use lora_core::models::blip::{
    BlipCaptioner, ImageCaptioner, WordPieceDecoder, DEFAULT_MAX_NEW_TOKENS,
};
use lora_core::models::config::BlipConfig;
use lora_core::models::image_processor::ImageProcessor;

/// f32 against PyTorch's f32, relative (Frobenius) error.
const TOLERANCE: f32 = 1e-4;

fn folder() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/blip-tiny")
}

fn expected() -> Result<HashMap<String, Tensor>> {
    let path = folder().join("expected.safetensors");
    candle_core::safetensors::load(&path, &Device::Cpu)
        .with_context(|| format!("cannot read {}", path.display()))
}

fn meta() -> Result<serde_json::Value> {
    Ok(serde_json::from_str(&std::fs::read_to_string(
        folder().join("expected.json"),
    )?)?)
}

fn get<'a>(map: &'a HashMap<String, Tensor>, key: &str) -> &'a Tensor {
    map.get(key)
        .unwrap_or_else(|| panic!("expected.safetensors has no `{key}`"))
}

fn rel_err(ours: &Tensor, reference: &Tensor) -> f32 {
    assert_eq!(ours.dims(), reference.dims());
    let ours = ours.to_dtype(DType::F32).unwrap();
    let reference = reference.to_dtype(DType::F32).unwrap();
    let diff = (&ours - &reference)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap();
    let norm = reference.sqr().unwrap().sum_all().unwrap();
    (diff.to_scalar::<f32>().unwrap() / norm.to_scalar::<f32>().unwrap()).sqrt()
}

#[track_caller]
fn assert_close(ours: &Tensor, reference: &Tensor, what: &str) {
    let err = rel_err(ours, reference);
    println!("{what}: relative error {err:.3e}");
    assert!(err <= TOLERANCE, "{what}: relative error {err:.3e}");
}

/// transformers' generated rows, without the padding after a row's `[SEP]`.
fn reference_rows(ids: &Tensor, sep: u32, prefix: usize) -> Result<Vec<Vec<u32>>> {
    let rows = ids.to_dtype(DType::U32)?.to_vec2::<u32>()?;
    Ok(rows
        .into_iter()
        .map(|mut row| {
            if let Some(end) = row[prefix..].iter().position(|&id| id == sep) {
                row.truncate(prefix + end + 1);
            }
            row
        })
        .collect())
}

fn model() -> Result<BlipCaptioner> {
    BlipCaptioner::load(&folder(), DType::F32, &Device::Cpu)
}

#[test]
fn image_features_and_logits_match_transformers() -> Result<()> {
    let exp = expected()?;
    let model = model()?;
    let pixels = get(&exp, "pixel_values");
    let features = model.image_features(pixels)?;
    assert_close(
        &features,
        get(&exp, "vision_last_hidden_state"),
        "vision last_hidden_state",
    );
    let logits = model.logits(pixels, get(&exp, "prefix_ids"))?;
    assert_close(&logits, get(&exp, "prefix_logits"), "decoder logits");
    Ok(())
}

#[test]
fn greedy_decoding_matches_transformers() -> Result<()> {
    let exp = expected()?;
    let meta = meta()?;
    let model = model()?;
    let pixels = get(&exp, "pixel_values");
    let sep = model.config().text.sep_token_id;
    let max_new_tokens = meta["max_new_tokens"].as_u64().context("max_new_tokens")? as usize;

    let ours = model.generate(pixels, &[], max_new_tokens)?;
    let reference = reference_rows(get(&exp, "generated_ids"), sep, 1)?;
    assert_eq!(ours, reference, "unprompted greedy captions");

    // The processor's ids for the prompt are `[CLS] words… [SEP]`; transformers keeps the words.
    let prompt_ids: Vec<u32> = serde_json::from_value(meta["prompt_ids"].clone())?;
    let words = &prompt_ids[1..prompt_ids.len() - 1];
    let ours = model.generate(pixels, words, max_new_tokens)?;
    let reference = reference_rows(get(&exp, "generated_prompt_ids"), sep, 1 + words.len())?;
    assert_eq!(ours, reference, "prompted greedy captions");
    Ok(())
}

#[test]
fn decoding_matches_transformers() -> Result<()> {
    let meta = meta()?;
    let tokenizer = WordPieceDecoder::from_file(&folder().join("tokenizer.json"))?;
    let cases = meta["decode_cases"].as_array().context("decode_cases")?;
    let generated = [
        ("generated_ids", "generated_text"),
        ("generated_prompt_ids", "generated_prompt_text"),
    ];
    let mut checked = 0;
    for case in cases {
        let ids: Vec<u32> = serde_json::from_value(case["ids"].clone())?;
        assert_eq!(
            tokenizer.decode(&ids)?,
            case["text"].as_str().unwrap(),
            "{ids:?}"
        );
        checked += 1;
    }
    for (ids_key, text_key) in generated {
        let rows: Vec<Vec<u32>> = serde_json::from_value(meta[ids_key].clone())?;
        let texts: Vec<String> = serde_json::from_value(meta[text_key].clone())?;
        for (ids, text) in rows.iter().zip(&texts) {
            assert_eq!(&tokenizer.decode(ids)?, text, "{ids:?}");
            checked += 1;
        }
    }
    assert_eq!(checked, cases.len() + 4);
    let config = BlipConfig::from_file(&folder().join("config.json"))?;
    assert_eq!(tokenizer.token_id("[DEC]"), Some(config.text.bos_token_id));
    assert_eq!(tokenizer.token_id("[SEP]"), Some(config.text.sep_token_id));
    Ok(())
}

fn images(meta: &serde_json::Value) -> Result<Vec<image::RgbImage>> {
    let names = meta["images"].as_array().context("expected.json images")?;
    anyhow::ensure!(!names.is_empty(), "no images in expected.json");
    names
        .iter()
        .map(|name| {
            let path = folder()
                .join("images")
                .join(name.as_str().context("image name")?);
            Ok(image::open(&path)
                .with_context(|| format!("cannot read {}", path.display()))?
                .to_rgb8())
        })
        .collect()
}

/// transformers 5's BlipImageProcessor (torchvision backend on uint8 tensors): the same pixel
/// values, to f32 rounding of the fused normalisation.
#[test]
fn image_processing_matches_transformers() -> Result<()> {
    let processor = ImageProcessor::load(
        &folder(),
        lora_core::models::image_processor::ProcessorKind::Blip,
    )?;
    let ours = processor.pixel_values(&images(&meta()?)?, &Device::Cpu)?;
    let reference = get(&expected()?, "pixel_values").clone();
    assert_eq!(ours.dims(), reference.dims());
    let worst = (&ours - &reference)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?;
    println!("pixel values: largest difference {worst:.3e}");
    // One uint8 level is 1/(255·0.27) ≈ 0.0146 here; a float rounding is ~1e-6.
    assert!(worst <= 1e-5, "pixel values differ by up to {worst}");
    Ok(())
}

/// Image files to caption text, end to end: transformers' `batch_decode(generate(...),
/// skip_special_tokens=True)`.
#[test]
fn captions_of_image_files_match_transformers() -> Result<()> {
    let meta = meta()?;
    let captioner = ImageCaptioner::load(&folder(), DType::F32, &Device::Cpu)?;
    let max_new_tokens = meta["max_new_tokens"].as_u64().context("max_new_tokens")? as usize;
    let ours = captioner.caption(&images(&meta)?, max_new_tokens)?;
    let expected: Vec<String> = serde_json::from_value(meta["generated_text"].clone())?;
    // The fixture's first caption ends at once (empty), its second has words.
    assert_eq!(ours.len(), 2);
    assert!(ours.iter().any(|c| !c.is_empty()), "{ours:?}");
    assert_eq!(ours, expected);
    Ok(())
}

/// Full size, outside CI: the random-weight BLIP in the configuration of
/// Salesforce/blip-image-captioning-large that `tests/reference/check_blip_full_size.py` writes
/// (about 1.9 GB), at `BLIP_FULL_SIZE_DIR`. Run with `--release -- --ignored`.
#[test]
#[ignore = "needs BLIP_FULL_SIZE_DIR from tests/reference/check_blip_full_size.py"]
fn full_size_captions_match_transformers() -> Result<()> {
    let dir = PathBuf::from(
        std::env::var("BLIP_FULL_SIZE_DIR")
            .context("set BLIP_FULL_SIZE_DIR (see the doc comment)")?,
    );
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json"))?)?;
    let exp = candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu)?;
    let start = std::time::Instant::now();
    let captioner = ImageCaptioner::load(&dir, DType::F32, &Device::Cpu)?;
    println!("load: {:.2} s", start.elapsed().as_secs_f64());
    let names = meta["images"].as_array().context("images")?;
    let images = names
        .iter()
        .map(|n| -> Result<image::RgbImage> {
            Ok(image::open(dir.join("images").join(n.as_str().context("name")?))?.to_rgb8())
        })
        .collect::<Result<Vec<_>>>()?;
    let pixels = captioner.processor().pixel_values(&images, &Device::Cpu)?;
    let worst = (&pixels - get(&exp, "pixel_values"))?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?;
    println!("pixel values: largest difference {worst:.3e}");
    assert!(worst <= 1e-5);
    let model = BlipCaptioner::load(&dir, DType::F32, &Device::Cpu)?;
    let start = std::time::Instant::now();
    let features = model.image_features(&pixels)?;
    println!(
        "vision, {} images: {:.2} s",
        images.len(),
        start.elapsed().as_secs_f64()
    );
    assert_close(&features, get(&exp, "vision_last_hidden_state"), "vision");
    let start = std::time::Instant::now();
    let ours = captioner.caption(&images, DEFAULT_MAX_NEW_TOKENS)?;
    println!(
        "caption, {} images: {:.2} s",
        images.len(),
        start.elapsed().as_secs_f64()
    );
    let expected: Vec<String> = serde_json::from_value(meta["generated_text"].clone())?;
    println!("ours: {ours:?}\ntransformers: {expected:?}");
    assert_eq!(ours, expected);
    Ok(())
}
