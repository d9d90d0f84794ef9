//! UMT5-XXL text encoder, tokenizer and prompt cleaning, as Wan uses them.
//!
//! - [`TextEncoder`]: the UMT5 encoder (`UMT5EncoderModel` in transformers), loaded from a diffusers
//!   `text_encoder/` folder or the official `models_t5_umt5-xxl-enc-bf16.pth` (strict keys).
//! - [`Tokenizer`]: `tokenizer.json` through the `tokenizers` crate.
//! - [`clean_prompt`]: Wan's prompt cleaning (ftfy repair, HTML unescape twice, whitespace collapse);
//!   see [`clean`] for what is ported and the remaining differences.
//! - [`encode_prompts`]: prompts -> `[B, 512, d_model]` embeddings with zero rows past each prompt's
//!   length, exactly the `prompt_embeds` diffusers' `WanPipeline._get_t5_prompt_embeds` builds.
//!
//! Stage discipline: the encoder is an ordinary value; load it (on the GPU, or on the CPU to leave
//! the GPU to the diffusion transformer), encode, and drop it before loading the transformer.
//! [`encode_prompts_once`] does exactly that.

pub mod clean;
pub mod config;
pub mod model;
pub mod tokenizer;

use std::path::Path;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};

use crate::component::{ComponentOptions, Inputs, Outputs};
use crate::invalid;

pub use self::clean::clean_prompt;
pub use self::config::Umt5Config;
pub use self::model::TextEncoder;
pub use self::tokenizer::{TokenizedBatch, Tokenizer};

/// Wan's text length: prompts are tokenized to at most 512 tokens and embeddings padded to 512 rows.
pub const TEXT_LEN: usize = 512;

/// Cleans, tokenizes (512, EOS kept) and encodes `prompts`. Returns `[B, 512, d_model]` in the
/// encoder's dtype on its device: rows `< len_i` are the encoder output, rows `>= len_i` exactly 0,
/// where `len_i` counts the prompt's real tokens (EOS included).
///
/// The encoder runs on the first `max(len_i)` positions only: with the padding mask, real tokens
/// never see padded ones and the relative bias depends only on distances, so the kept rows are the
/// ones a 512-position run gives (up to summation order), at a fraction of the cost for short
/// prompts.
pub fn encode_prompts(
    encoder: &TextEncoder,
    tokenizer: &Tokenizer,
    prompts: &[&str],
) -> Result<Tensor> {
    encode_prompts_with_length(encoder, tokenizer, prompts, TEXT_LEN)
}

/// [`encode_prompts`] with another `max_sequence_length` (diffusers' pipeline argument).
pub fn encode_prompts_with_length(
    encoder: &TextEncoder,
    tokenizer: &Tokenizer,
    prompts: &[&str],
    max_length: usize,
) -> Result<Tensor> {
    if prompts.is_empty() {
        return Err(invalid!("prompt: at least one prompt is required"));
    }
    let vocab = encoder.config().vocab_size;
    if tokenizer.vocab_size() > vocab {
        return Err(invalid!(
            "tokenizer: {} tokens but the text encoder's vocabulary has {vocab}; they do not belong together",
            tokenizer.vocab_size()
        ));
    }
    let batch = tokenize_cleaned(tokenizer, prompts, max_length)?;
    let used = batch.lengths.iter().copied().max().unwrap_or(1).max(1);
    let ids = batch.input_ids.narrow(1, 0, used)?;
    let mask = batch.attention_mask.narrow(1, 0, used)?;
    let hidden = encoder.forward(&ids, Some(&mask))?;
    zero_pad_rows(&hidden, &batch.lengths, max_length)
}

/// Wan's prompt cleaning, then the tokenizer (at most `max_length` tokens, EOS kept).
fn tokenize_cleaned(
    tokenizer: &Tokenizer,
    prompts: &[&str],
    max_length: usize,
) -> Result<TokenizedBatch> {
    let cleaned: Vec<String> = prompts.iter().map(|p| clean_prompt(p)).collect();
    let refs: Vec<&str> = cleaned.iter().map(String::as_str).collect();
    tokenizer.encode_batch(&refs, max_length)
}

/// The positions the encoder runs on for the longest of `prompts` when each is encoded on its
/// own, as the text stage does (the memory plan sizes the encoder's activations by it).
pub fn longest_prompt_tokens(tokenizer: &Tokenizer, prompts: &[&str]) -> Result<usize> {
    let mut longest = 1;
    for prompt in prompts {
        let batch = tokenize_cleaned(tokenizer, &[prompt], TEXT_LEN)?;
        longest = longest.max(batch.lengths.iter().copied().max().unwrap_or(1));
    }
    Ok(longest)
}

/// Keeps rows `< lengths[b]` of `hidden` `[B, L, D]`, zeroes the rest, and pads with zero rows to
/// `total` (diffusers: `torch.cat([u[:v], u.new_zeros(total - v, D)])`).
pub fn zero_pad_rows(hidden: &Tensor, lengths: &[usize], total: usize) -> Result<Tensor> {
    let (b, l, d) = hidden.dims3()?;
    anyhow::ensure!(
        lengths.len() == b && l <= total,
        "zero_pad_rows: bad lengths or target"
    );
    let keep: Vec<u8> = lengths
        .iter()
        .flat_map(|&n| (0..l).map(move |i| u8::from(i < n)))
        .collect();
    let keep = Tensor::from_vec(keep, (b, l, 1), hidden.device())?.broadcast_as((b, l, d))?;
    let zeros = Tensor::zeros((b, l, d), hidden.dtype(), hidden.device())?;
    let kept = keep.where_cond(hidden, &zeros)?;
    if l == total {
        return Ok(kept);
    }
    let pad = Tensor::zeros((b, total - l, d), hidden.dtype(), hidden.device())?;
    Ok(Tensor::cat(&[&kept, &pad], 1)?)
}

/// Stage helper: loads the encoder from `model` on `device`, encodes `prompts`, frees the encoder,
/// and returns the embeddings moved to `output_device` (e.g. encode on the CPU while the GPU is
/// reserved for the transformer).
pub fn encode_prompts_once(
    model: &Path,
    tokenizer: &Tokenizer,
    prompts: &[&str],
    device: &Device,
    dtype: DType,
    output_device: &Device,
) -> Result<Tensor> {
    let encoder = TextEncoder::load(model, device, dtype)?;
    let embeds = encode_prompts(&encoder, tokenizer, prompts)?;
    drop(encoder);
    Ok(embeds.to_device(output_device)?)
}

/// `run-component text-encode`: inputs `input_ids` i64 `[B, L]` and optional `attention_mask` i64
/// `[B, L]` (all ones when absent); output `last_hidden_state` `[B, L, d_model]`, the raw encoder
/// output for every position as `UMT5EncoderModel` returns it. No settings.
pub fn run_component(model: &Path, inputs: &Inputs, opts: &ComponentOptions) -> Result<Outputs> {
    let ids = inputs.int("input_ids", &[2])?;
    let mask = if inputs.contains("attention_mask") {
        let m = inputs.int("attention_mask", &[2])?;
        if m.dims() != ids.dims() {
            return Err(invalid!(
                "attention_mask: shape {:?} must equal input_ids shape {:?}",
                m.dims(),
                ids.dims()
            ));
        }
        Some(m)
    } else {
        None
    };
    let (b, l) = ids.dims2()?;
    if b == 0 || l == 0 {
        return Err(invalid!("input_ids: shape {:?} is empty", ids.dims()));
    }
    let encoder = TextEncoder::load(model, &opts.device, opts.dtype)?;
    let hidden = encoder.forward(&ids, mask.as_ref())?;
    Ok(vec![("last_hidden_state".to_string(), hidden)])
}
