//! The prompt each generated image was made from, for the CLIP score.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};

/// The prompts in a text file, one per non-empty line.
pub fn read_prompt_lines(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read prompts file {}", path.display()))?;
    let prompts: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    ensure!(
        !prompts.is_empty(),
        "prompts file {} holds no prompts",
        path.display()
    );
    Ok(prompts)
}

/// The prompt of each of `images`: from a text file with one line per image (in the given
/// order) or a single line for all, or from a `.jsonl` of `{"file_name": …, "text": …}` rows
/// (Hugging Face's imagefolder metadata; `prompt` or `caption` also accepted).
pub fn prompts_for_images(images: &[PathBuf], path: &Path) -> Result<Vec<String>> {
    if path.extension().is_some_and(|e| e == "jsonl") {
        return prompts_from_metadata(images, path);
    }
    let lines = read_prompt_lines(path)?;
    match lines.len() {
        1 => Ok(vec![lines[0].clone(); images.len()]),
        n if n == images.len() => Ok(lines),
        n => bail!(
            "prompts file {} has {n} prompts for {} images: give one line per image (in \
             file-name order) or one line for all",
            path.display(),
            images.len()
        ),
    }
}

fn prompts_from_metadata(images: &[PathBuf], path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read prompts file {}", path.display()))?;
    let mut by_name = HashMap::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let row: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{} line {}: not JSON", path.display(), i + 1))?;
        let name = row["file_name"]
            .as_str()
            .with_context(|| format!("{} line {}: no `file_name` string", path.display(), i + 1))?;
        let prompt = ["text", "prompt", "caption"]
            .iter()
            .find_map(|k| row[k].as_str())
            .with_context(|| {
                format!(
                    "{} line {}: no `text`, `prompt` or `caption` string",
                    path.display(),
                    i + 1
                )
            })?;
        by_name.insert(name.to_owned(), prompt.to_owned());
    }
    images
        .iter()
        .map(|image| {
            let name = image.file_name().unwrap_or_default().to_string_lossy();
            by_name
                .get(name.as_ref())
                .cloned()
                .with_context(|| format!("{} has no row for image {name}", path.display()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn images(n: usize) -> Vec<PathBuf> {
        (0..n)
            .map(|i| PathBuf::from(format!("/x/img{i}.png")))
            .collect()
    }

    #[test]
    fn lines_pair_with_images_or_serve_all() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.txt");
        std::fs::write(&file, "a cat\n\na dog\n").unwrap();
        assert_eq!(
            prompts_for_images(&images(2), &file).unwrap(),
            ["a cat", "a dog"]
        );
        let err = prompts_for_images(&images(3), &file)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("2 prompts for 3 images") && err.contains("p.txt"),
            "{err}"
        );
        std::fs::write(&file, "one for all\n").unwrap();
        assert_eq!(prompts_for_images(&images(3), &file).unwrap().len(), 3);
        std::fs::write(&file, "\n\n").unwrap();
        let err = prompts_for_images(&images(1), &file)
            .unwrap_err()
            .to_string();
        assert!(err.contains("holds no prompts"), "{err}");
    }

    #[test]
    fn metadata_rows_are_matched_by_file_name() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("metadata.jsonl");
        std::fs::write(
            &file,
            "{\"file_name\": \"img1.png\", \"text\": \"b\"}\n{\"file_name\": \"img0.png\", \"caption\": \"a\"}\n",
        )
        .unwrap();
        assert_eq!(prompts_for_images(&images(2), &file).unwrap(), ["a", "b"]);
        let err = prompts_for_images(&images(3), &file)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no row for image img2.png"), "{err}");
        std::fs::write(&file, "{\"file_name\": 3}\n").unwrap();
        let err = format!("{:#}", prompts_for_images(&images(1), &file).unwrap_err());
        assert!(err.contains("line 1") && err.contains("file_name"), "{err}");
    }
}
