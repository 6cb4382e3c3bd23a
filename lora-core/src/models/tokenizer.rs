//! CLIP byte-level BPE tokenization of prompts into the fixed-length id sequences the text encoder
//! takes.
//!
//! The BPE itself is instant-clip-tokenizer's, fed either the model's own `tokenizer/merges.txt`
//! (checked against `tokenizer/vocab.json`) or the OpenAI CLIP vocabulary it embeds. Padding is
//! ours: instant-clip-tokenizer's batch API pads with id 0 (`!`), right for SD 2.x but not for
//! SD 1.x, which pads with `<|endoftext|>`.
//!
//! Known differences from transformers' tokenizer, none of which affects ordinary prompts: no NFC
//! normalisation; the literal text `<|endoftext|>` in a prompt is tokenized as characters rather
//! than as the special token, while instant-clip-tokenizer's own markers `<start_of_text>` and
//! `<end_of_text>` do become the special tokens.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{Device, Tensor};
use instant_clip_tokenizer::Tokenizer;

use crate::models::config::ClipTextConfig;

/// The start-of-text and end-of-text tokens as written in `vocab.json` and the tokenizer files.
const BOS_TOKEN: &str = "<|startoftext|>";
const EOS_TOKEN: &str = "<|endoftext|>";
/// Byte tokens, then the same bytes marked end-of-word: the ids below the first merge.
const BASE_TOKENS: usize = 512;
/// Suffix marking the last piece of a word in the vocabulary.
const END_OF_WORD: &str = "</w>";
/// Size of the embedded OpenAI vocabulary: 512 base tokens, 48,894 merges and the two specials.
const EMBEDDED_VOCAB_SIZE: usize = 49408;

/// One prompt as model input: exactly `max_length` ids, BOS first, EOS after the text, padding
/// after that.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedPrompt {
    pub ids: Vec<u32>,
    /// Whether the prompt was cut to fit (callers should warn: the rest is ignored).
    pub truncated: bool,
}

impl TokenizedPrompt {
    /// Stacks prompts of equal length into a `[batch, max_length]` u32 tensor.
    pub fn batch_tensor(prompts: &[TokenizedPrompt], device: &Device) -> Result<Tensor> {
        let len = prompts
            .first()
            .context("cannot batch zero prompts")?
            .ids
            .len();
        ensure!(
            prompts.iter().all(|p| p.ids.len() == len),
            "prompts to batch differ in length (expected {len} ids each)"
        );
        let flat: Vec<u32> = prompts.iter().flat_map(|p| p.ids.iter().copied()).collect();
        Ok(Tensor::from_vec(flat, (prompts.len(), len), device)?)
    }
}

pub struct ClipTokenizer {
    bpe: Tokenizer,
    pad_id: u32,
    max_length: usize,
}

impl ClipTokenizer {
    /// The tokenizer for a model: from `tokenizer_dir` (a diffusers `tokenizer/` folder) when it has
    /// `vocab.json` and `merges.txt`, otherwise the embedded OpenAI vocabulary. The pad token comes
    /// from the folder's `special_tokens_map.json` or `tokenizer_config.json`, else from the text
    /// encoder's `pad_token_id`; the length from `tokenizer_config.json`'s `model_max_length`,
    /// else the text encoder's `max_position_embeddings`.
    pub fn load(tokenizer_dir: Option<&Path>, text_config: &ClipTextConfig) -> Result<Self> {
        let files = tokenizer_dir
            .map(TokenizerFiles::read)
            .transpose()?
            .unwrap_or_default();
        Self::from_files(files, text_config)
    }

    /// The embedded OpenAI vocabulary, padding with `pad_token` (a built-in model's tokenizer:
    /// SD 1.x and SD 2.x differ only in that).
    pub fn embedded(text_config: &ClipTextConfig, pad_token: &str) -> Result<Self> {
        let files = TokenizerFiles {
            pad_token: Some(pad_token.to_owned()),
            ..TokenizerFiles::default()
        };
        Self::from_files(files, text_config)
    }

    fn from_files(files: TokenizerFiles, text_config: &ClipTextConfig) -> Result<Self> {
        let (bpe, vocab) = match (&files.vocab_json, &files.merges_txt) {
            (Some(vocab_json), Some(merges_txt)) => {
                let vocab = FolderVocabulary::parse(vocab_json, merges_txt)?;
                ensure!(
                    vocab.ids.len() <= text_config.vocab_size,
                    "tokenizer/vocab.json has {} tokens but the text encoder's vocab_size is {}",
                    vocab.ids.len(),
                    text_config.vocab_size
                );
                (vocab.tokenizer(merges_txt)?, Some(vocab))
            }
            (None, None) => {
                ensure!(
                    text_config.vocab_size >= EMBEDDED_VOCAB_SIZE,
                    "no tokenizer/vocab.json and merges.txt, and the embedded OpenAI vocabulary ({EMBEDDED_VOCAB_SIZE} \
                     tokens) does not fit the text encoder's vocab_size = {}",
                    text_config.vocab_size
                );
                (Tokenizer::new(), None)
            }
            (Some(_), None) => bail!("tokenizer folder has vocab.json but no merges.txt"),
            (None, Some(_)) => bail!("tokenizer folder has merges.txt but no vocab.json"),
        };

        let pad_id = match &files.pad_token {
            Some(token) => match &vocab {
                Some(vocab) => vocab.id(token)?,
                None => embedded_token_id(token, &bpe)?,
            },
            None => text_config.pad_token_id.context(
                "no pad token: expected tokenizer/special_tokens_map.json, tokenizer/tokenizer_config.json or the \
                 text encoder's pad_token_id",
            )?,
        };

        let max_length = files
            .model_max_length
            .unwrap_or(text_config.max_position_embeddings);
        ensure!(
            (3..=text_config.max_position_embeddings).contains(&max_length),
            "tokenizer model_max_length = {max_length}: expected 3 to the text encoder's max_position_embeddings = {}",
            text_config.max_position_embeddings
        );
        Ok(Self {
            bpe,
            pad_id,
            max_length,
        })
    }

    /// BOS, the prompt's tokens, EOS, then padding to `max_length`. Longer prompts keep their first
    /// `max_length − 2` tokens (and still end with EOS), as transformers truncates.
    pub fn encode(&self, prompt: &str) -> TokenizedPrompt {
        let mut tokens = vec![self.bpe.start_of_text()];
        self.bpe.encode(prompt, &mut tokens);
        let truncated = tokens.len() + 1 > self.max_length;
        tokens.truncate(self.max_length - 1);
        tokens.push(self.bpe.end_of_text());
        let mut ids: Vec<u32> = tokens.into_iter().map(|t| u32::from(t.to_u16())).collect();
        ids.resize(self.max_length, self.pad_id);
        TokenizedPrompt { ids, truncated }
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    pub fn bos_id(&self) -> u32 {
        u32::from(self.bpe.start_of_text().to_u16())
    }

    pub fn eos_id(&self) -> u32 {
        u32::from(self.bpe.end_of_text().to_u16())
    }
}

/// What a diffusers `tokenizer/` folder says; every part is optional.
#[derive(Default)]
struct TokenizerFiles {
    vocab_json: Option<String>,
    merges_txt: Option<String>,
    pad_token: Option<String>,
    model_max_length: Option<usize>,
}

impl TokenizerFiles {
    fn read(dir: &Path) -> Result<Self> {
        ensure!(
            dir.is_dir(),
            "tokenizer folder {} does not exist",
            dir.display()
        );
        let read = |name: &str| -> Result<Option<String>> {
            let path = dir.join(name);
            if !path.is_file() {
                return Ok(None);
            }
            std::fs::read_to_string(&path)
                .map(Some)
                .with_context(|| format!("cannot read {}", path.display()))
        };
        let json = |name: &str| -> Result<Option<serde_json::Value>> {
            read(name)?
                .map(|text| {
                    serde_json::from_str(&text)
                        .with_context(|| format!("{} is not valid JSON", dir.join(name).display()))
                })
                .transpose()
        };
        let special_tokens_map = json("special_tokens_map.json")?;
        let tokenizer_config = json("tokenizer_config.json")?;

        let mut pad_token = None;
        for (name, file) in [
            ("special_tokens_map.json", &special_tokens_map),
            ("tokenizer_config.json", &tokenizer_config),
        ] {
            if let Some(value) = file
                .as_ref()
                .and_then(|f| f.get("pad_token"))
                .filter(|v| !v.is_null())
            {
                pad_token = Some(
                    token_content(value)
                        .with_context(|| format!("{}: pad_token", dir.join(name).display()))?,
                );
                break;
            }
        }
        let model_max_length = match tokenizer_config
            .as_ref()
            .and_then(|c| c.get("model_max_length"))
        {
            None => None,
            Some(v) => Some(
                v.as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .with_context(|| {
                        format!(
                            "{}: model_max_length = {v}: expected a token count",
                            dir.join("tokenizer_config.json").display()
                        )
                    })?,
            ),
        };
        Ok(Self {
            vocab_json: read("vocab.json")?,
            merges_txt: read("merges.txt")?,
            pad_token,
            model_max_length,
        })
    }
}

/// A special token entry is either the token text or an `AddedToken` object with `content`.
fn token_content(value: &serde_json::Value) -> Result<String> {
    let text = match value {
        serde_json::Value::Object(fields) => fields.get("content").and_then(|c| c.as_str()),
        other => other.as_str(),
    };
    text.map(str::to_owned)
        .with_context(|| format!("{value}: expected a string or an object with `content`"))
}

/// The 256 single-byte tokens in id order. Byte-level BPE renders each byte as a printable
/// character: the printable Latin-1 bytes as themselves (these come first), every other byte as
/// U+0100 + its rank among those bytes.
fn byte_alphabet() -> Vec<char> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut alphabet: Vec<char> = (0..=255u8)
        .filter(|&b| printable(b))
        .map(char::from)
        .collect();
    let others = (0..=255u8).filter(|&b| !printable(b)).count() as u32;
    alphabet
        .extend((0..others).map(|k| char::from_u32(0x100 + k).expect("U+0100.. are valid chars")));
    alphabet
}

/// Id of `token` in the embedded vocabulary, for the tokens a pad token can sensibly be: the two
/// specials and the single-byte tokens (whose ids do not depend on the merges).
fn embedded_token_id(token: &str, bpe: &Tokenizer) -> Result<u32> {
    match token {
        BOS_TOKEN => return Ok(u32::from(bpe.start_of_text().to_u16())),
        EOS_TOKEN => return Ok(u32::from(bpe.end_of_text().to_u16())),
        _ => {}
    }
    let (body, offset) = match token.strip_suffix(END_OF_WORD) {
        Some(body) => (body, BASE_TOKENS / 2),
        None => (token, 0),
    };
    let mut chars = body.chars();
    let position = match (chars.next(), chars.next()) {
        (Some(c), None) => byte_alphabet().iter().position(|&a| a == c),
        _ => None,
    };
    let id = position.with_context(|| {
        format!("pad token `{token}` is not a special or single-character token; provide tokenizer/vocab.json to use it")
    })?;
    Ok((id + offset) as u32)
}

/// A folder's `vocab.json`, verified against the ids its `merges.txt` implies.
struct FolderVocabulary {
    ids: HashMap<String, u32>,
}

impl FolderVocabulary {
    /// CLIP's vocabulary is fully determined by its merges: the 256 byte tokens, the same with
    /// `</w>`, one token per merge (the concatenation of the pair) and the two specials, in that
    /// order. instant-clip-tokenizer assigns ids that way, so any other `vocab.json` would silently
    /// produce wrong ids; check every entry.
    fn parse(vocab_json: &str, merges_txt: &str) -> Result<Self> {
        let ids: HashMap<String, u32> = serde_json::from_str(vocab_json)
            .context("tokenizer/vocab.json: expected a JSON object of token → id")?;
        let mut lines = merges_txt.lines();
        let header = lines.next().unwrap_or_default();
        ensure!(
            header.starts_with("#version"),
            "tokenizer/merges.txt: first line `{header}` is not a `#version` header"
        );
        let merges: Vec<(&str, &str)> = lines
            .enumerate()
            .map(|(i, line)| {
                let mut parts = line.split(' ');
                match (parts.next(), parts.next(), parts.next()) {
                    (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty() => Ok((a, b)),
                    _ => bail!(
                        "tokenizer/merges.txt line {}: `{line}` is not a pair `a b`",
                        i + 2
                    ),
                }
            })
            .collect::<Result<_>>()?;
        let expected_len = BASE_TOKENS + merges.len() + 2;
        ensure!(
            ids.len() == expected_len,
            "tokenizer/vocab.json has {} tokens but merges.txt implies {expected_len} (512 byte tokens + {} merges + 2 specials)",
            ids.len(),
            merges.len()
        );
        ensure!(
            ids.len() <= usize::from(u16::MAX),
            "tokenizer/vocab.json has {} tokens: at most 65535 are supported",
            ids.len()
        );

        let alphabet = byte_alphabet();
        let byte_tokens = alphabet.iter().map(|c| c.to_string());
        let end_of_word_tokens = alphabet.iter().map(|c| format!("{c}{END_OF_WORD}"));
        let merged_tokens = merges.iter().map(|(a, b)| format!("{a}{b}"));
        let specials = [BOS_TOKEN.to_owned(), EOS_TOKEN.to_owned()];
        let implied = byte_tokens
            .chain(end_of_word_tokens)
            .chain(merged_tokens)
            .chain(specials);
        for (expected_id, token) in implied.enumerate() {
            match ids.get(&token) {
                Some(&id) if id as usize == expected_id => {}
                found => bail!(
                    "tokenizer/vocab.json is inconsistent with merges.txt: `{token}` has id {found:?}, expected {expected_id}"
                ),
            }
        }
        Ok(Self { ids })
    }

    fn tokenizer(&self, merges_txt: &str) -> Result<Tokenizer> {
        let size = u16::try_from(self.ids.len()).expect("checked at parse");
        Tokenizer::with_vocabulary(std::io::Cursor::new(merges_txt), size)
            .context("tokenizer/merges.txt rejected by the BPE")
    }

    fn id(&self, token: &str) -> Result<u32> {
        self.ids
            .get(token)
            .copied()
            .with_context(|| format!("pad token `{token}` is not in tokenizer/vocab.json"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use instant_clip_tokenizer::Token;

    fn config(pad_token_id: Option<u32>) -> ClipTextConfig {
        let json = format!(
            r#"{{"vocab_size": 49408, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
                "num_attention_heads": 2, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                "layer_norm_eps": 1e-5, "pad_token_id": {}}}"#,
            pad_token_id.map_or("null".to_owned(), |p| p.to_string())
        );
        ClipTextConfig::parse(&json).unwrap()
    }

    #[test]
    fn embedded_vocabulary_pads_with_the_configured_id() {
        let tok = ClipTokenizer::load(None, &config(Some(49407))).unwrap();
        let p = tok.encode("a photo of sks dog");
        assert_eq!(
            &p.ids[..8],
            &[49406, 320, 1125, 539, 48136, 1929, 49407, 49407]
        );
        assert_eq!(p.ids.len(), 77);
        assert!(!p.truncated);
        assert!(p.ids[6..].iter().all(|&i| i == 49407));

        let tok = ClipTokenizer::load(None, &config(Some(0))).unwrap();
        assert!(tok.encode("a photo").ids[4..].iter().all(|&i| i == 0));
    }

    #[test]
    fn long_prompts_are_truncated_keeping_eos() {
        let tok = ClipTokenizer::load(None, &config(Some(49407))).unwrap();
        let exact = tok.encode(&["dog"; 75].join(" "));
        assert!(!exact.truncated);
        assert_eq!((exact.ids[75], exact.ids[76]), (1929, 49407));
        let long = tok.encode(&["dog"; 76].join(" "));
        assert!(long.truncated);
        assert_eq!(long.ids.len(), 77);
        assert_eq!(
            (long.ids[0], long.ids[75], long.ids[76]),
            (49406, 1929, 49407)
        );
    }

    #[test]
    fn pad_token_from_tokenizer_files_wins_over_config() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("special_tokens_map.json"),
            r#"{"pad_token": {"content": "!", "lstrip": false}}"#,
        )
        .unwrap();
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"model_max_length": 77}"#,
        )
        .unwrap();
        let tok = ClipTokenizer::load(Some(dir.path()), &config(Some(1))).unwrap();
        assert_eq!(tok.pad_id(), 0);
        assert_eq!(
            (tok.bos_id(), tok.eos_id(), tok.max_length()),
            (49406, 49407, 77)
        );

        std::fs::write(
            dir.path().join("special_tokens_map.json"),
            r#"{"pad_token": "<|endoftext|>"}"#,
        )
        .unwrap();
        assert_eq!(
            ClipTokenizer::load(Some(dir.path()), &config(Some(1)))
                .unwrap()
                .pad_id(),
            49407
        );

        std::fs::write(
            dir.path().join("special_tokens_map.json"),
            r#"{"pad_token": "dog</w>"}"#,
        )
        .unwrap();
        let err = ClipTokenizer::load(Some(dir.path()), &config(None))
            .err()
            .unwrap();
        assert!(
            format!("{err:#}").contains("provide tokenizer/vocab.json"),
            "{err:#}"
        );
    }

    #[test]
    fn embedded_single_byte_token_ids() {
        let bpe = Tokenizer::new();
        for (token, id) in [("!", 0), ("a", 64), ("a</w>", 320), ("!</w>", 256)] {
            assert_eq!(embedded_token_id(token, &bpe).unwrap(), id, "{token}");
        }
        // Cross-check the end-of-word ids with the BPE, which marks a lone character that way.
        for (text, id) in [("a", 320), ("!", 256)] {
            let mut encoded = Vec::new();
            bpe.encode(text, &mut encoded);
            assert_eq!(encoded, [Token::from_u16(id, &bpe).unwrap()]);
        }
        assert_eq!(embedded_token_id("<|endoftext|>", &bpe).unwrap(), 49407);
    }

    /// A miniature vocabulary in the real layout: 512 base tokens, `merges` and the specials.
    fn write_folder(dir: &Path, merges: &[(&str, &str)], pad: &str) {
        let alphabet = byte_alphabet();
        let mut tokens: Vec<String> = alphabet.iter().map(|c| c.to_string()).collect();
        tokens.extend(alphabet.iter().map(|c| format!("{c}</w>")));
        tokens.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
        tokens.extend([BOS_TOKEN.to_owned(), EOS_TOKEN.to_owned()]);
        let vocab: serde_json::Map<String, serde_json::Value> = tokens
            .into_iter()
            .enumerate()
            .map(|(i, t)| (t, i.into()))
            .collect();
        std::fs::write(
            dir.join("vocab.json"),
            serde_json::to_string(&vocab).unwrap(),
        )
        .unwrap();
        let lines: Vec<String> = merges.iter().map(|(a, b)| format!("{a} {b}")).collect();
        std::fs::write(
            dir.join("merges.txt"),
            format!("#version: 0.2\n{}\n", lines.join("\n")),
        )
        .unwrap();
        std::fs::write(
            dir.join("special_tokens_map.json"),
            format!(r#"{{"pad_token": "{pad}"}}"#),
        )
        .unwrap();
    }

    #[test]
    fn folder_vocabulary_is_used_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let merges = [("d", "o"), ("do", "g</w>"), ("c", "a")];
        write_folder(dir.path(), &merges, "<|endoftext|>");
        let tok = ClipTokenizer::load(Some(dir.path()), &config(Some(0))).unwrap();
        // "dog" → "dog</w>" (512 + 1); "cat" → "ca" (512 + 2), "t</w>".
        let t_eow = 256 + byte_alphabet().iter().position(|&c| c == 't').unwrap() as u32;
        assert_eq!(
            &tok.encode("Dog cat").ids[..6],
            &[515, 513, 514, t_eow, 516, 516]
        );
        assert_eq!((tok.bos_id(), tok.eos_id(), tok.pad_id()), (515, 516, 516));

        // Swap two ids: the vocabulary no longer matches what the merges imply.
        let text = std::fs::read_to_string(dir.path().join("vocab.json")).unwrap();
        let swapped = text
            .replace("\"dog</w>\":513", "\"dog</w>\":999")
            .replace("\"ca\":514", "\"ca\":513");
        let swapped = swapped.replace("\"dog</w>\":999", "\"dog</w>\":514");
        std::fs::write(dir.path().join("vocab.json"), swapped).unwrap();
        let err = ClipTokenizer::load(Some(dir.path()), &config(Some(0)))
            .err()
            .unwrap();
        assert!(
            format!("{err:#}").contains("`dog</w>` has id Some(514), expected 513"),
            "{err:#}"
        );

        write_folder(dir.path(), &merges, "<|endoftext|>");
        std::fs::write(dir.path().join("merges.txt"), "#version: 0.2\nd o\n").unwrap();
        let err = ClipTokenizer::load(Some(dir.path()), &config(Some(0)))
            .err()
            .unwrap();
        assert!(
            format!("{err:#}").contains("merges.txt implies 515"),
            "{err:#}"
        );

        std::fs::remove_file(dir.path().join("merges.txt")).unwrap();
        let err = ClipTokenizer::load(Some(dir.path()), &config(Some(0)))
            .err()
            .unwrap();
        assert!(format!("{err:#}").contains("no merges.txt"), "{err:#}");
    }

    #[test]
    fn batches_into_a_tensor() {
        let tok = ClipTokenizer::load(None, &config(Some(49407))).unwrap();
        let prompts = [tok.encode("a"), tok.encode("b c")];
        let t = TokenizedPrompt::batch_tensor(&prompts, &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[2, 77]);
        assert_eq!(t.to_vec2::<u32>().unwrap()[1], prompts[1].ids);
    }
}
