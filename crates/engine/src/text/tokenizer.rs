//! The umT5 tokenizer, run by the `tokenizers` crate from the `tokenizer.json` shipped with the
//! models (`google/umt5-xxl/` in official Wan folders, `tokenizer/` in diffusers pipelines).
//!
//! Wan calls it with `padding="max_length", truncation=True, max_length=512,
//! add_special_tokens=True`: the T5 post-processor appends `</s>`, truncation keeps room for it (511
//! text tokens + EOS at most), padding uses `<pad>` (id 0) on the right, and the mask is 1 on real
//! tokens (EOS included).
//!
//! The pipeline in `tokenizer.json` is used as written (normalizer, pre-tokenizer, model,
//! post-processor), as `transformers` 4.x and the `tokenizers` library do. transformers 5.x rebuilds
//! a T5 tokenizer around the file's vocabulary with its own pre-tokenizer (whitespace split +
//! Metaspace) and keeps only the file's `Precompiled` normalizer. On the fixture (a tokenizer.json
//! written by transformers 5) both agree on every test prompt. For an older file whose normalizer
//! also strips and collapses spaces, the two can only differ on whitespace, which Wan's cleaning has
//! already collapsed and trimmed; that case is reasoned, not tested against the real file.

use std::path::Path;

use anyhow::Result;
use candle_core::{Device, Tensor};
use tokenizers::models::unigram::Unigram;
use tokenizers::normalizers::unicode::NFKC;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{
    PaddingDirection, PaddingParams, PaddingStrategy, TruncationDirection, TruncationParams,
    TruncationStrategy,
};

use crate::invalid;

/// Token ids and attention mask of a batch, each `[B, max_length]` i64 on the CPU.
pub struct TokenizedBatch {
    pub input_ids: Tensor,
    pub attention_mask: Tensor,
    /// Real tokens per row (mask > 0), EOS included.
    pub lengths: Vec<usize>,
}

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pad_id: u32,
    pad_token: String,
}

impl Tokenizer {
    /// Reads `tokenizer.json`, or a folder holding it (diffusers `tokenizer/`, official
    /// `google/umt5-xxl/`, or a pipeline / Wan root containing one of those).
    pub fn from_file(path: &Path) -> Result<Self> {
        let file = resolve_tokenizer_json(path)?;
        let inner = tokenizers::Tokenizer::from_file(&file)
            .map_err(|e| invalid!("{}: not a readable tokenizer.json: {e}", file.display()))?;
        Self::new(inner)
    }

    /// Parses a `tokenizer.json` held in memory.
    pub fn from_json(json: &str) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_bytes(json.as_bytes())
            .map_err(|e| invalid!("tokenizer.json: not valid: {e}"))?;
        Self::new(inner)
    }

    /// Wraps a `tokenizers` tokenizer; it must define `<pad>` (T5 convention: id 0).
    pub fn new(inner: tokenizers::Tokenizer) -> Result<Self> {
        let pad_token = "<pad>".to_string();
        let pad_id = inner.token_to_id(&pad_token).ok_or_else(|| {
            invalid!("tokenizer.json: no `<pad>` token; this is not a T5/umT5 tokenizer")
        })?;
        Ok(Self {
            inner,
            pad_id,
            pad_token,
        })
    }

    /// A small built-in umT5-style tokenizer (no download) for the demo model: unigram over single
    /// characters and a few word pieces, NFKC, Metaspace, `$A </s>`, pad 0 / eos 1 / unk 2.
    pub fn demo() -> Result<Self> {
        let mut vocab: Vec<(String, f64)> = vec![
            ("<pad>".into(), 0.0),
            ("</s>".into(), 0.0),
            ("<unk>".into(), 0.0),
            ("▁".into(), -2.0),
        ];
        for word in DEMO_WORDS {
            vocab.push((format!("▁{word}"), -3.0 - word.len() as f64 * 0.1));
        }
        for c in (0x21u8..0x7f).map(char::from) {
            vocab.push((c.to_string(), -8.0));
            if c.is_ascii_alphanumeric() {
                vocab.push((format!("▁{c}"), -8.5));
            }
        }
        let model = Unigram::from(vocab, Some(2), false)
            .map_err(|e| anyhow::anyhow!("building the demo tokenizer: {e}"))?;
        let mut inner = tokenizers::Tokenizer::new(model);
        inner
            .with_normalizer(Some(NFKC))
            .map_err(|e| anyhow::anyhow!("demo tokenizer: {e}"))?;
        inner.with_pre_tokenizer(Some(Metaspace::new('▁', PrependScheme::Always, true)));
        inner.with_decoder(Some(Metaspace::new('▁', PrependScheme::Always, true)));
        let post = TemplateProcessing::builder()
            .try_single("$A </s>")
            .map_err(|e| anyhow::anyhow!("demo tokenizer: {e}"))?
            .special_tokens(vec![("</s>", 1)])
            .build()
            .map_err(|e| anyhow::anyhow!("demo tokenizer: {e}"))?;
        inner.with_post_processor(Some(post));
        Self::new(inner)
    }

    /// Vocabulary size including added tokens (must not exceed the encoder's `vocab_size`).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Token ids of one text with `</s>`, truncated to `max_length` (no padding).
    pub fn encode(&self, text: &str, max_length: usize) -> Result<Vec<u32>> {
        let tok = self.configured(max_length, false)?;
        let enc = tok
            .encode(text, true)
            .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Tokenizes a batch exactly like Wan: padded to `max_length`, truncated to it (EOS kept).
    pub fn encode_batch(&self, texts: &[&str], max_length: usize) -> Result<TokenizedBatch> {
        if max_length == 0 {
            return Err(invalid!("max_length: must be at least 1"));
        }
        let tok = self.configured(max_length, true)?;
        let mut ids = Vec::with_capacity(texts.len() * max_length);
        let mut mask = Vec::with_capacity(texts.len() * max_length);
        let mut lengths = Vec::with_capacity(texts.len());
        for text in texts {
            let enc = tok
                .encode(*text, true)
                .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
            anyhow::ensure!(
                enc.get_ids().len() == max_length,
                "tokenizer padding did not apply"
            );
            ids.extend(enc.get_ids().iter().map(|&i| i as i64));
            mask.extend(enc.get_attention_mask().iter().map(|&m| m as i64));
            lengths.push(enc.get_attention_mask().iter().filter(|&&m| m > 0).count());
        }
        let shape = (texts.len(), max_length);
        Ok(TokenizedBatch {
            input_ids: Tensor::from_vec(ids, shape, &Device::Cpu)?,
            attention_mask: Tensor::from_vec(mask, shape, &Device::Cpu)?,
            lengths,
        })
    }

    /// A copy with HF's call-time settings (`truncation=True`, `padding="max_length"`), so that the
    /// shared tokenizer is never mutated.
    fn configured(&self, max_length: usize, pad: bool) -> Result<tokenizers::Tokenizer> {
        let mut tok = self.inner.clone();
        tok.with_truncation(Some(TruncationParams {
            max_length,
            strategy: TruncationStrategy::LongestFirst,
            stride: 0,
            direction: TruncationDirection::Right,
        }))
        .map_err(|e| anyhow::anyhow!("tokenizer truncation: {e}"))?;
        tok.with_padding(pad.then(|| PaddingParams {
            strategy: PaddingStrategy::Fixed(max_length),
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id: self.pad_id,
            pad_type_id: 0,
            pad_token: self.pad_token.clone(),
        }));
        Ok(tok)
    }
}

/// Words the demo tokenizer keeps whole, so demo prompts give short, varied id sequences.
const DEMO_WORDS: &[&str] = &[
    "a", "the", "of", "and", "in", "on", "with", "cat", "dog", "city", "night", "sky", "sea",
    "walking", "running", "red", "blue", "green", "light", "camera", "video", "slow", "motion",
    "close", "up",
];

fn resolve_tokenizer_json(path: &Path) -> Result<std::path::PathBuf> {
    if path.is_file() {
        return Ok(path.to_path_buf());
    }
    if path.is_dir() {
        for candidate in [
            "tokenizer.json",
            "tokenizer/tokenizer.json",
            "google/umt5-xxl/tokenizer.json",
        ] {
            let p = path.join(candidate);
            if p.is_file() {
                return Ok(p);
            }
        }
        return Err(invalid!(
            "{}: no tokenizer.json (looked for tokenizer.json, tokenizer/tokenizer.json, google/umt5-xxl/tokenizer.json)",
            path.display()
        ));
    }
    Err(invalid!("tokenizer: {} does not exist", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_tokenizer_pads_truncates_and_appends_eos() {
        let tok = Tokenizer::demo().unwrap();
        let ids = tok.encode("a cat walking", 512).unwrap();
        assert_eq!(*ids.last().unwrap(), 1);
        assert!(ids.len() < 6, "{ids:?}");
        let long = "x ".repeat(600);
        let b = tok.encode_batch(&["a dog", &long], 16).unwrap();
        assert_eq!(b.input_ids.dims(), &[2, 16]);
        assert_eq!(b.lengths[1], 16);
        let row: Vec<i64> = b.input_ids.get(1).unwrap().to_vec1().unwrap();
        assert_eq!(row[15], 1, "EOS kept after truncation");
        let row0: Vec<i64> = b.input_ids.get(0).unwrap().to_vec1().unwrap();
        assert_eq!(&row0[b.lengths[0]..], &vec![0; 16 - b.lengths[0]][..]);
    }
}
