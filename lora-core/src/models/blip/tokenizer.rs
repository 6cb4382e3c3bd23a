//! Turning BLIP's generated ids into text: the WordPiece vocabulary and decoder of a Hugging Face
//! `tokenizer.json` (BLIP's BERT tokenizer), as transformers' `decode(ids,
//! skip_special_tokens=True)` does it. Encoding a prompt is not here yet.

use std::collections::HashSet;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use serde::Deserialize;
use serde_json::Value;

pub struct WordPieceDecoder {
    /// Token text by id: the WordPiece vocabulary, then the added tokens at their ids.
    tokens: Vec<String>,
    /// Ids of the added tokens marked special (`[PAD]`, `[CLS]`, `[SEP]`, `[DEC]`, …).
    special: HashSet<u32>,
    /// The continuing-subword prefix (`##`).
    prefix: String,
    /// Whether the decoder's `cleanup` joins punctuation and contractions (`" ."` → `"."`).
    cleanup: bool,
}

#[derive(Deserialize)]
struct RawTokenizer {
    added_tokens: Vec<AddedToken>,
    decoder: Option<Value>,
    model: RawModel,
}

#[derive(Deserialize)]
struct AddedToken {
    id: u32,
    content: String,
    special: bool,
}

#[derive(Deserialize)]
struct RawModel {
    #[serde(rename = "type")]
    kind: String,
    vocab: std::collections::HashMap<String, u32>,
}

impl WordPieceDecoder {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("invalid tokenizer {}", path.display()))
    }

    pub fn parse(json: &str) -> Result<Self> {
        let raw: RawTokenizer = serde_json::from_str(json).context("malformed tokenizer.json")?;
        ensure!(
            raw.model.kind == "WordPiece",
            "model type `{}`: expected WordPiece (a BERT tokenizer)",
            raw.model.kind
        );
        let (prefix, cleanup) = match &raw.decoder {
            Some(decoder) if decoder["type"] == "WordPiece" => (
                decoder["prefix"].as_str().unwrap_or("##").to_owned(),
                decoder["cleanup"].as_bool().unwrap_or(true),
            ),
            Some(decoder) => bail!("decoder {decoder}: expected a WordPiece decoder"),
            None => bail!("no decoder: expected a WordPiece decoder"),
        };
        let size = raw
            .model
            .vocab
            .values()
            .chain(raw.added_tokens.iter().map(|t| &t.id))
            .max()
            .map_or(0, |&id| id as usize + 1);
        let mut tokens: Vec<Option<String>> = vec![None; size];
        for (token, &id) in &raw.model.vocab {
            tokens[id as usize] = Some(token.clone());
        }
        for added in &raw.added_tokens {
            tokens[added.id as usize] = Some(added.content.clone());
        }
        let tokens = tokens
            .into_iter()
            .enumerate()
            .map(|(id, token)| token.with_context(|| format!("no token has id {id}")))
            .collect::<Result<_>>()?;
        let special = raw
            .added_tokens
            .iter()
            .filter(|t| t.special)
            .map(|t| t.id)
            .collect();
        Ok(Self {
            tokens,
            special,
            prefix,
            cleanup,
        })
    }

    /// Whether `id` is a special token, which decoding leaves out.
    pub fn is_special(&self, id: u32) -> bool {
        self.special.contains(&id)
    }

    /// The id of a token (`[SEP]`, a word), if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.tokens
            .iter()
            .position(|t| t == token)
            .map(|id| id as u32)
    }

    /// The text of `ids` without the special tokens: word pieces joined to the word before them,
    /// other tokens separated by a space, then the decoder's cleanup.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let mut text = String::new();
        let kept = ids.iter().filter(|id| !self.special.contains(id));
        for (i, &id) in kept.enumerate() {
            let token = self
                .tokens
                .get(id as usize)
                .with_context(|| format!("token id {id} is outside the vocabulary"))?;
            let piece = match token.strip_prefix(self.prefix.as_str()) {
                Some(rest) if i > 0 => rest.to_owned(),
                _ if i > 0 => format!(" {token}"),
                _ => token.clone(),
            };
            text.push_str(&if self.cleanup { cleanup(&piece) } else { piece });
        }
        Ok(text)
    }
}

/// The tokenizers WordPiece decoder's cleanup, applied to each token with its leading space.
fn cleanup(piece: &str) -> String {
    [
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" do not", " don't"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ]
    .iter()
    .fold(piece.to_owned(), |text, (from, to)| text.replace(from, to))
}
