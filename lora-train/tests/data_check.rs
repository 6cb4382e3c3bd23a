//! `lora-train data check`: a dataset with one planted problem of each kind has exactly those
//! problems, each on the right file; the same dataset without them has none; the binary's JSON,
//! readable report and exit codes; parquet rows and imagefolder captions.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::fixtures;
use image::{Rgb, RgbImage};
use lora_train::data_check::{check, CheckOptions, CheckReport, ProblemKind};
use lora_train::dataset::ScanOptions;
use serde_json::Value;

/// The check's resolution in these tests: `too-small` is then a shorter side below 64 px.
const RESOLUTION: usize = 128;

/// A `w`×`h` picture of 4×4 blocks of colours drawn from `seed`: pictures of different seeds
/// share no layout, so their perceptual hashes are far apart.
fn picture(seed: u64, w: u32, h: u32) -> RgbImage {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        // xorshift64: enough to scatter the block colours.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 56) as u8
    };
    let blocks: Vec<[u8; 3]> = (0..16).map(|_| [next(), next(), next()]).collect();
    RgbImage::from_fn(w, h, |x, y| {
        let (bx, by) = ((x * 4 / w) as usize, (y * 4 / h) as usize);
        Rgb(blocks[by * 4 + bx])
    })
}

fn save(image: &RgbImage, path: &Path) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    image.save(path).unwrap();
}

/// An image and its caption file (none when `caption` is `None`).
fn captioned(dir: &Path, name: &str, image: &RgbImage, caption: Option<&str>) {
    let path = dir.join(name);
    save(image, &path);
    if let Some(caption) = caption {
        std::fs::write(path.with_extension("txt"), caption).unwrap();
    }
}

/// A clean kohya dataset: two captioned images at the top, two in `10_sks dog` (one captioned by
/// the folder's words, having no caption file).
fn clean_dataset(root: &Path) {
    captioned(
        root,
        "clean_a.png",
        &picture(1, 128, 128),
        Some("sks dog, grass, sunny"),
    );
    captioned(
        root,
        "clean_b.png",
        &picture(2, 160, 128),
        Some("sks dog, beach"),
    );
    let folder = root.join("10_sks dog");
    captioned(&folder, "d.png", &picture(3, 128, 192), None);
    captioned(
        &folder,
        "e.png",
        &picture(4, 128, 128),
        Some("a sks dog, grass"),
    );
}

/// The file names of [`planted_dataset`]'s problems, with their kind.
const PLANTED: [(&str, ProblemKind); 8] = [
    ("unreadable.png", ProblemKind::Unreadable),
    ("uncaptioned.png", ProblemKind::MissingCaption),
    ("empty.png", ProblemKind::EmptyCaption),
    ("copy.png", ProblemKind::Duplicate),
    ("near.png", ProblemKind::NearDuplicate),
    ("small.png", ProblemKind::TooSmall),
    ("long.png", ProblemKind::LongCaption),
    ("wide.png", ProblemKind::ExtremeAspect),
];

/// [`clean_dataset`] plus one image with each problem of [`PLANTED`] (and nothing else wrong
/// with it).
fn planted_dataset(root: &Path) {
    clean_dataset(root);
    std::fs::write(root.join("unreadable.png"), b"not a PNG at all").unwrap();
    std::fs::write(root.join("unreadable.txt"), "sks dog").unwrap();
    captioned(root, "uncaptioned.png", &picture(5, 128, 128), None);
    captioned(root, "empty.png", &picture(6, 128, 128), Some(""));
    std::fs::copy(root.join("clean_a.png"), root.join("copy.png")).unwrap();
    std::fs::write(root.join("copy.txt"), "sks dog, copy").unwrap();
    // clean_b shrunk and a little brighter: other pixels, the same picture.
    let near = image::DynamicImage::ImageRgb8(picture(2, 160, 128))
        .resize_exact(140, 112, image::imageops::FilterType::Lanczos3)
        .brighten(8)
        .to_rgb8();
    captioned(root, "near.png", &near, Some("sks dog, beach again"));
    captioned(
        root,
        "small.png",
        &picture(7, 48, 48),
        Some("sks dog, small"),
    );
    let long = vec!["dog"; 80].join(" ");
    captioned(root, "long.png", &picture(8, 128, 128), Some(&long));
    captioned(
        root,
        "wide.png",
        &picture(9, 400, 80),
        Some("sks dog, panorama"),
    );
}

fn options(resolution: usize) -> CheckOptions {
    CheckOptions {
        resolution,
        scan: ScanOptions::default(),
    }
}

fn file_name(file: &str) -> String {
    Path::new(file)
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

fn lora_train(args: &[&str], source: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lora-train"))
        .args(["data", "check"])
        .arg(source)
        .args(args)
        .output()
        .unwrap()
}

fn json_of(output: &Output) -> Value {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

#[test]
fn every_planted_problem_is_found_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    planted_dataset(dir.path());
    let report = check(dir.path(), &options(RESOLUTION)).unwrap();

    let found: BTreeSet<(String, ProblemKind)> = report
        .problems
        .iter()
        .map(|p| (file_name(&p.file), p.kind))
        .collect();
    let expected: BTreeSet<(String, ProblemKind)> = PLANTED
        .iter()
        .map(|&(name, kind)| (name.to_string(), kind))
        .collect();
    assert_eq!(found, expected, "{:#?}", report.problems);
    assert_eq!(
        report.problems.len(),
        PLANTED.len(),
        "{:#?}",
        report.problems
    );
    for kind in ProblemKind::ALL {
        assert_eq!(report.problems_by_kind[&kind], 1, "{kind:?}");
    }

    // The pairs name the earlier image; an exact copy is not also a near-duplicate.
    let pair = |kind| {
        let problem = report.problems.iter().find(|p| p.kind == kind).unwrap();
        let other = problem
            .other
            .as_deref()
            .expect("a pair names the other file");
        assert!(problem.detail.contains(other), "{problem:?}");
        file_name(other)
    };
    assert_eq!(pair(ProblemKind::Duplicate), "clean_a.png");
    assert_eq!(pair(ProblemKind::NearDuplicate), "clean_b.png");

    // Every image but the unreadable and the uncaptioned one trains.
    assert_eq!(report.images, 10);
    assert_eq!(report.samples, 8 + 2 * 10);
}

#[test]
fn a_clean_dataset_has_no_problems_and_its_summary_counts_what_training_sees() {
    let dir = tempfile::tempdir().unwrap();
    clean_dataset(dir.path());
    let report: CheckReport = check(dir.path(), &options(RESOLUTION)).unwrap();
    assert!(report.is_clean(), "{:#?}", report.problems);
    assert!(report.problems_by_kind.values().all(|&n| n == 0));
    assert_eq!((report.images, report.samples), (4, 22));

    let s = &report.summary;
    let folders: Vec<(String, usize, usize, usize)> = s
        .folders
        .iter()
        .map(|f| (file_name(&f.folder), f.images, f.repeats, f.samples))
        .collect();
    let top = file_name(&dir.path().display().to_string());
    assert_eq!(
        folders,
        [(top, 2, 1, 2), ("10_sks dog".to_string(), 2, 10, 20)]
    );
    for histogram in [&s.shorter_sides, &s.aspect_ratios, &s.caption_tokens] {
        assert_eq!(histogram.iter().map(|b| b.images).sum::<usize>(), 4);
    }
    let bin = |bins: &[lora_train::data_check::summary::Bin], name: &str| {
        bins.iter().find(|b| b.bin == name).unwrap().images
    };
    assert_eq!(bin(&s.shorter_sides, "128-255"), 4);
    // 160x128 is 5:4, 128x192 is 2:3; the rest square.
    assert_eq!(bin(&s.aspect_ratios, "3:4 to 4:3"), 3);
    assert_eq!(bin(&s.aspect_ratios, "1:2 to 3:4"), 1);
    // "sks dog, grass, sunny" is 6 tokens: every caption is short.
    assert_eq!(bin(&s.caption_tokens, "1-15"), 4);
    // At 128 px, 5:4 and 2:3 are nearest the square bucket of 64 px steps too.
    let buckets: Vec<(usize, usize, usize)> = s
        .buckets
        .iter()
        .map(|b| (b.width, b.height, b.images))
        .collect();
    assert_eq!(buckets, [(128, 128, 4)]);

    let tags: Vec<(&str, usize)> = s
        .tags
        .iter()
        .map(|t| (t.tag.as_str(), t.captions))
        .collect();
    // Most frequent first; equal counts alphabetical.
    assert_eq!(
        tags,
        [
            ("sks dog", 3),
            ("grass", 2),
            ("a sks dog", 1),
            ("beach", 1),
            ("sunny", 1)
        ]
    );
    assert_eq!(s.trigger_words.len(), 1);
    let trigger = &s.trigger_words[0];
    assert_eq!((trigger.trigger.as_str(), trigger.captions), ("sks dog", 4));
    assert!((trigger.share - 1.0).abs() < 1e-12, "{}", trigger.share);
}

#[test]
fn the_binary_prints_json_or_a_report_and_exits_0_1_or_2() {
    let dir = tempfile::tempdir().unwrap();
    let (clean, planted) = (dir.path().join("clean"), dir.path().join("planted"));
    clean_dataset(&clean);
    planted_dataset(&planted);
    let resolution = ["--resolution", "128"];

    let output = lora_train(&[&resolution[..], &["--json"]].concat(), &clean);
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let json = json_of(&output);
    assert_eq!(json["problems"], Value::Array(Vec::new()));
    assert_eq!(
        (json["images"].as_u64(), json["samples"].as_u64()),
        (Some(4), Some(22))
    );
    let by_kind = json["problems_by_kind"].as_object().unwrap();
    assert_eq!(by_kind.len(), 8);
    assert!(
        by_kind.values().all(|n| n.as_u64() == Some(0)),
        "{by_kind:?}"
    );
    for key in [
        "folders",
        "shorter_sides",
        "aspect_ratios",
        "buckets",
        "caption_tokens",
        "tags",
        "trigger_words",
    ] {
        assert!(
            json["summary"][key]
                .as_array()
                .is_some_and(|a| !a.is_empty()),
            "summary.{key}: {}",
            json["summary"]
        );
    }

    let output = lora_train(&[&resolution[..], &["--json"]].concat(), &planted);
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let json = json_of(&output);
    let found: BTreeSet<(String, String)> = json["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            assert!(p["detail"].as_str().is_some_and(|d| !d.is_empty()), "{p}");
            (
                file_name(p["file"].as_str().unwrap()),
                p["kind"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let expected: BTreeSet<(String, String)> = PLANTED
        .iter()
        .map(|&(name, kind)| (name.to_string(), kind.name().to_string()))
        .collect();
    assert_eq!(found, expected);
    assert_eq!(json["problems"].as_array().unwrap().len(), 8);

    // The readable report says the same.
    let output = lora_train(&resolution, &planted);
    assert_eq!(output.status.code(), Some(1));
    let text = String::from_utf8(output.stdout).unwrap();
    for (name, kind) in PLANTED {
        assert!(
            text.lines()
                .any(|l| l.contains(kind.name()) && l.contains(name)),
            "{name} {kind:?} not in:\n{text}"
        );
    }
    let output = lora_train(&resolution, &clean);
    assert_eq!(output.status.code(), Some(0));
    assert!(String::from_utf8(output.stdout)
        .unwrap()
        .contains("no problems found"));

    // Usage errors and a source that cannot be read: 2, with the reason on stderr.
    let missing = dir.path().join("no-such-folder");
    for (args, source, says) in [
        (&[][..], missing.as_path(), "does not exist"),
        (
            &["--resolution", "0"][..],
            clean.as_path(),
            "--resolution = 0",
        ),
        (
            &["--caption-ext", "txt"][..],
            clean.as_path(),
            "--caption-ext",
        ),
        (&["--no-such-flag"][..], clean.as_path(), "--no-such-flag"),
    ] {
        let output = lora_train(args, source);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
        assert!(output.stdout.is_empty(), "{args:?}");
    }
}

#[test]
fn a_dataset_with_nothing_usable_still_reports_its_problems() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("broken.png"), b"\x89PNG truncated").unwrap();
    std::fs::write(dir.path().join("broken.txt"), "a caption").unwrap();
    let report = check(dir.path(), &options(RESOLUTION)).unwrap();
    assert_eq!((report.images, report.samples), (0, 0));
    let found: Vec<(String, ProblemKind)> = report
        .problems
        .iter()
        .map(|p| (file_name(&p.file), p.kind))
        .collect();
    assert_eq!(found, [("broken.png".to_string(), ProblemKind::Unreadable)]);
    assert!(report.summary.trigger_words.is_empty());
    let output = lora_train(&["--json"], dir.path());
    assert_eq!(output.status.code(), Some(1), "{output:?}");
}

#[test]
fn parquet_rows_are_named_by_row() {
    let source = fixtures().join("hf-datasets/embedded.parquet");
    let report = check(&source, &CheckOptions::default()).unwrap();
    assert_eq!(report.images, 5);
    let too_small: Vec<&str> = report
        .problems
        .iter()
        .filter(|p| p.kind == ProblemKind::TooSmall)
        .map(|p| p.file.as_str())
        .collect();
    let expected: Vec<String> = (0..5)
        .map(|row| format!("{} row {row}", source.display()))
        .collect();
    assert_eq!(too_small, expected);
    assert!(report
        .problems
        .iter()
        .filter(|p| p.kind == ProblemKind::TooSmall)
        .all(|p| p
            .detail
            .starts_with("32x32: the shorter side 32 px is below 256 px")));
    // Nothing else but one true finding: rows 2 and 4 are the same green triangle (the fixture
    // folder's `small.png` and `uncaptioned.png`), drawn twice.
    let others: Vec<(&str, ProblemKind, Option<&str>)> = report
        .problems
        .iter()
        .filter(|p| p.kind != ProblemKind::TooSmall)
        .map(|p| (p.file.as_str(), p.kind, p.other.as_deref()))
        .collect();
    assert_eq!(
        others,
        [(
            expected[4].as_str(),
            ProblemKind::NearDuplicate,
            Some(expected[2].as_str())
        )]
    );
    assert_eq!(report.summary.folders.len(), 1);
    assert_eq!(
        report.summary.folders[0].folder,
        source.display().to_string()
    );
}

#[test]
fn imagefolder_null_and_empty_captions_are_told_apart() {
    let dir = tempfile::tempdir().unwrap();
    let root: PathBuf = dir.path().to_path_buf();
    for (seed, name) in [(1, "a.png"), (2, "b.png"), (3, "c.png")] {
        save(&picture(seed, 128, 128), &root.join(name));
    }
    std::fs::write(
        root.join("metadata.jsonl"),
        "{\"file_name\": \"a.png\", \"text\": \"a dog\"}\n\
         {\"file_name\": \"b.png\", \"text\": null}\n\
         {\"file_name\": \"c.png\", \"text\": \"  \"}\n",
    )
    .unwrap();
    let report = check(&root, &options(RESOLUTION)).unwrap();
    let found: BTreeSet<(String, ProblemKind)> = report
        .problems
        .iter()
        .map(|p| (file_name(&p.file), p.kind))
        .collect();
    assert_eq!(
        found,
        [
            ("b.png".to_string(), ProblemKind::MissingCaption),
            ("c.png".to_string(), ProblemKind::EmptyCaption)
        ]
        .into_iter()
        .collect()
    );
    assert_eq!(report.images, 1);
}
