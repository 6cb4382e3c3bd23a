//! Which parquet files of a dataset folder make a split, as `datasets` decides it: the README's
//! `configs:` when it has them (what `push_to_hub` writes), else the file and folder names
//! (`data/train-00000-of-00002.parquet`, `test/x.parquet`, …), and when no name says a split,
//! every file is `train`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use globset::{GlobBuilder, GlobSetBuilder};
use lora_core::source::HubDataset;
use yaml_rust2::{Yaml, YamlLoader};

const README: &str = "README.md";
const PARQUET_EXTENSION: &str = "parquet";

/// The split names `datasets` recognises in file and folder names, each with the split it means.
const SPLIT_WORDS: [(&str, &str); 10] = [
    ("train", "train"),
    ("training", "train"),
    ("validation", "validation"),
    ("valid", "validation"),
    ("val", "validation"),
    ("dev", "validation"),
    ("test", "test"),
    ("testing", "test"),
    ("eval", "test"),
    ("evaluation", "test"),
];

pub(super) fn is_parquet_file(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case(PARQUET_EXTENSION))
}

/// Whether `dir` holds a parquet file anywhere (it is then a parquet dataset, whatever its split).
pub(super) fn holds_parquet(dir: &Path) -> Result<bool> {
    Ok(files_under(dir, Path::new(""))?
        .iter()
        .any(|f| is_parquet_file(f)))
}

/// The parquet files of `split` in `dir`, in order, or `None` when `dir` holds no parquet file
/// (it is then another kind of dataset folder).
pub(super) fn split_files(dir: &Path, split: &str) -> Result<Option<Vec<PathBuf>>> {
    let files = files_under(dir, Path::new(""))?;
    let readme_path = dir.join(README);
    let readme = match readme_path.is_file() {
        true => Some(
            std::fs::read_to_string(&readme_path)
                .with_context(|| format!("cannot read {}", readme_path.display()))?,
        ),
        false => None,
    };
    let chosen = choose_split(
        &format!("dataset {}", dir.display()),
        &files,
        readme.as_deref(),
        split,
    )?;
    Ok(chosen.map(|files| files.iter().map(|f| dir.join(f)).collect()))
}

/// The files of `split` among a dataset's `files` (relative paths) given its README's text, or
/// `None` when there is no parquet file. `dataset` names the dataset in errors.
fn choose_split(
    dataset: &str,
    files: &[PathBuf],
    readme: Option<&str>,
    split: &str,
) -> Result<Option<Vec<PathBuf>>> {
    if !files.iter().any(|f| is_parquet_file(f)) {
        return Ok(None);
    }
    let data_files = match readme {
        Some(text) => readme_data_files(text).with_context(|| format!("{dataset}: {README}"))?,
        None => None,
    };
    let chosen = match data_files {
        Some(splits) => {
            let Some(patterns) = splits.get(split) else {
                bail!(
                    "{dataset} has no split `{split}` (--split) in the `configs:` of its {README}; \
                     its splits: {}",
                    splits.keys().cloned().collect::<Vec<_>>().join(", ")
                );
            };
            matching(dataset, files, patterns)?
        }
        None => by_name(dataset, files, split)?,
    };
    Ok(Some(chosen))
}

/// The snapshot folder of the Hub dataset `id` in the Hugging Face cache, holding the parquet
/// files of `split`: the cached snapshot as it is when it has them (offline use), else the
/// README and those files downloaded into it.
pub(super) fn hub_dataset(id: &str, split: &str) -> Result<PathBuf> {
    if let Some(snapshot) = HubDataset::cached_snapshot(id) {
        if matches!(split_files(&snapshot, split), Ok(Some(_))) {
            return Ok(snapshot);
        }
    }
    let hub = HubDataset::open(id)?;
    let readme = match hub.files().iter().any(|f| f == README) {
        true => {
            let path = hub.get(README)?;
            Some(
                std::fs::read_to_string(&path)
                    .with_context(|| format!("cannot read {}", path.display()))?,
            )
        }
        false => None,
    };
    let files: Vec<PathBuf> = hub.files().iter().map(PathBuf::from).collect();
    let name = format!("Hub dataset `{id}`");
    let chosen = choose_split(&name, &files, readme.as_deref(), split)?.with_context(|| {
        format!(
            "{name} has no parquet files; only its parquet layout is read (the Hub converts most \
             datasets: download revision refs/convert/parquet and pass --data with that folder)"
        )
    })?;
    let mut snapshot = None;
    for file in &chosen {
        let path = hub.get(&file.to_string_lossy())?;
        snapshot = path
            .ancestors()
            .nth(file.components().count())
            .map(Path::to_path_buf);
    }
    snapshot.with_context(|| format!("{name}: split `{split}` has no files"))
}

/// The files matching any of `patterns` (globs relative to the dataset's root, as in `data_files`), which
/// must all be parquet.
fn matching(dataset: &str, files: &[PathBuf], patterns: &[String]) -> Result<Vec<PathBuf>> {
    let mut set = GlobSetBuilder::new();
    for pattern in patterns {
        let glob = GlobBuilder::new(pattern.trim_start_matches("./"))
            .literal_separator(true)
            .build()
            .with_context(|| format!("{dataset}: {README}: data_files pattern `{pattern}`"))?;
        set.add(glob);
    }
    let set = set.build()?;
    let chosen: Vec<PathBuf> = files.iter().filter(|f| set.is_match(f)).cloned().collect();
    ensure!(
        !chosen.is_empty(),
        "{dataset}: the data_files `{}` of its {README} match no file",
        patterns.join("`, `")
    );
    if let Some(other) = chosen.iter().find(|f| !is_parquet_file(f)) {
        bail!(
            "{dataset}: {} is not a parquet file; only the parquet layout of a Hub dataset is read \
             (a folder of images with a metadata.jsonl is read as an imagefolder)",
            other.display()
        );
    }
    Ok(chosen)
}

/// The parquet files of `split` by their names, when the README says nothing.
fn by_name(dataset: &str, files: &[PathBuf], split: &str) -> Result<Vec<PathBuf>> {
    let parquet: Vec<&PathBuf> = files.iter().filter(|f| is_parquet_file(f)).collect();
    let named: Vec<(&PathBuf, Option<&str>)> = parquet.iter().map(|f| (*f, split_of(f))).collect();
    if named.iter().all(|(_, s)| s.is_none()) {
        ensure!(
            split == "train",
            "{dataset}: its parquet files name no split, so they are all `train`; --split {split} \
             chooses none"
        );
        return Ok(parquet.into_iter().cloned().collect());
    }
    let chosen: Vec<PathBuf> = named
        .iter()
        .filter(|(_, s)| *s == Some(split))
        .map(|(f, _)| (*f).clone())
        .collect();
    if chosen.is_empty() {
        let mut found: Vec<&str> = named.iter().filter_map(|(_, s)| *s).collect();
        found.dedup();
        bail!(
            "{dataset} has no parquet files of split `{split}` (--split); its splits: {}",
            found.join(", ")
        );
    }
    Ok(chosen)
}

/// The split a file's name or folder says: a folder named by a split word, or a file name that
/// starts with one followed by `-`, `_`, `.`, a space or a digit.
fn split_of(relative: &Path) -> Option<&'static str> {
    let word_split = |word: &str| {
        SPLIT_WORDS
            .iter()
            .find(|(w, _)| w.eq_ignore_ascii_case(word))
            .map(|(_, s)| *s)
    };
    let mut components: Vec<String> = relative
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    let file = components.pop()?;
    for folder in components.iter().rev() {
        if let Some(split) = word_split(folder) {
            return Some(split);
        }
    }
    let stem_end = file
        .find(|c: char| matches!(c, '-' | '_' | '.' | ' ') || c.is_ascii_digit())
        .unwrap_or(file.len());
    word_split(&file[..stem_end])
}

/// The `data_files` of the README's chosen config, split name → patterns, or `None` without
/// `configs:` in its front matter.
fn readme_data_files(text: &str) -> Result<Option<BTreeMap<String, Vec<String>>>> {
    let Some(front_matter) = front_matter(text) else {
        return Ok(None);
    };
    let documents =
        YamlLoader::load_from_str(front_matter).context("the front matter is not YAML")?;
    let Some(configs) = documents.first().map(|d| &d["configs"]) else {
        return Ok(None);
    };
    let Yaml::Array(configs) = configs else {
        return Ok(None);
    };
    let config = configs
        .iter()
        .find(|c| c["default"].as_bool() == Some(true))
        .or_else(|| {
            configs
                .iter()
                .find(|c| c["config_name"].as_str() == Some("default"))
        })
        .or(configs.first())
        .context("`configs:` is empty")?;
    let base = config["data_dir"].as_str().map(|d| d.trim_end_matches('/'));
    let under = |pattern: String| match base {
        Some(base) => format!("{base}/{pattern}"),
        None => pattern,
    };
    let bad = || {
        format!(
            "`data_files` of config `{}` is neither a pattern, a list of patterns, nor a list of \
             `split:`/`path:` entries",
            config["config_name"].as_str().unwrap_or("?")
        )
    };
    let mut splits: BTreeMap<String, Vec<String>> = BTreeMap::new();
    match &config["data_files"] {
        // A config without data_files leaves the split to the file names.
        Yaml::BadValue => return Ok(None),
        Yaml::String(pattern) => {
            splits.insert("train".into(), vec![under(pattern.clone())]);
        }
        Yaml::Array(entries) => {
            for entry in entries {
                match entry {
                    Yaml::String(pattern) => splits
                        .entry("train".into())
                        .or_default()
                        .push(under(pattern.clone())),
                    Yaml::Hash(_) => {
                        let split = entry["split"].as_str().unwrap_or("train").to_string();
                        let patterns = patterns_of(&entry["path"]).with_context(bad)?;
                        splits
                            .entry(split)
                            .or_default()
                            .extend(patterns.into_iter().map(under));
                    }
                    _ => bail!(bad()),
                }
            }
        }
        Yaml::Hash(map) => {
            for (split, value) in map {
                let split = split.as_str().with_context(bad)?.to_string();
                let patterns = patterns_of(value).with_context(bad)?;
                splits
                    .entry(split)
                    .or_default()
                    .extend(patterns.into_iter().map(under));
            }
        }
        _ => bail!(bad()),
    }
    Ok(Some(splits))
}

/// A pattern or a list of patterns.
fn patterns_of(value: &Yaml) -> Option<Vec<String>> {
    match value {
        Yaml::String(pattern) => Some(vec![pattern.clone()]),
        Yaml::Array(list) => list
            .iter()
            .map(|p| p.as_str().map(str::to_string))
            .collect(),
        _ => None,
    }
}

/// The YAML between a leading `---` line and the next `---` line.
fn front_matter(text: &str) -> Option<&str> {
    let text = text.trim_start_matches('\u{feff}');
    let rest = text
        .strip_prefix("---\n")
        .or_else(|| text.strip_prefix("---\r\n"))?;
    let end = rest
        .match_indices("\n---")
        .map(|(i, _)| i)
        .find(|&i| matches!(rest[i + 4..].chars().next(), None | Some('\n' | '\r')))?;
    Some(&rest[..end])
}

/// Every visible file under `root/relative`, relative to `root`, sorted.
fn files_under(root: &Path, relative: &Path) -> Result<Vec<PathBuf>> {
    let dir = root.join(relative);
    let mut files = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("cannot list {}", dir.display()))?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name();
        if name.to_string_lossy().starts_with('.') {
            continue;
        }
        let path = relative.join(&name);
        if entry
            .file_type()
            .with_context(|| format!("cannot list {}", dir.display()))?
            .is_dir()
        {
            files.extend(files_under(root, &path)?);
        } else {
            files.push(path);
        }
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_names_follow_datasets_conventions() {
        let split = |p: &str| split_of(Path::new(p));
        assert_eq!(split("data/train-00000-of-00002.parquet"), Some("train"));
        assert_eq!(split("test/part.parquet"), Some("test"));
        assert_eq!(split("validation.parquet"), Some("validation"));
        assert_eq!(split("dev_0.parquet"), Some("validation"));
        assert_eq!(split("data/trainer.parquet"), None);
        assert_eq!(split("images.parquet"), None);
    }

    #[test]
    fn readme_configs_map_splits_to_patterns() {
        let text = String::from(
            "---\nlicense: mit\nconfigs:\n- config_name: other\n  data_files: x/*\n\
             - config_name: default\n  data_dir: d\n  data_files:\n  - split: train\n    \
             path: [a-*, b-*]\n  - split: test\n    path: t-*\n---\n# Title\n",
        );
        let splits = readme_data_files(&text).unwrap().unwrap();
        assert_eq!(splits["train"], ["d/a-*", "d/b-*"]);
        assert_eq!(splits["test"], ["d/t-*"]);
        assert!(readme_data_files("# no front matter\n").unwrap().is_none());
    }
}
