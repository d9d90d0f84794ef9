//! Wan prompt cleaning and the umT5 tokenizer against Python (tools/fixtures/gen_text.py): ftfy 6.3.1
//! `fix_text` and diffusers' `prompt_clean` on awkward strings, and transformers' T5 tokenizer ids
//! (padding to 512, truncation keeping EOS) on a tiny SentencePiece-unigram `tokenizer.json`.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use vidgen_engine::text::clean::fix_text;
use vidgen_engine::text::{clean_prompt, Tokenizer, TEXT_LEN};

fn fixtures() -> PathBuf {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/text"
    ))
    .to_path_buf()
}

#[derive(Deserialize)]
struct CleanCase {
    raw: String,
    fix_text: String,
    clean: String,
}

#[derive(Deserialize)]
struct TokenizerCase {
    prompt: String,
    cleaned: String,
    ids: Vec<i64>,
    length: usize,
}

fn read<T: for<'de> Deserialize<'de>>(name: &str) -> T {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join(name)).unwrap()).unwrap()
}

fn show(s: &str) -> String {
    let short: String = s.chars().take(60).collect();
    format!("{short:?}")
}

#[test]
fn cleaning_matches_python() {
    let cases: Vec<CleanCase> = read("clean_cases.json");
    let mut failures = Vec::new();
    for c in &cases {
        let fixed = fix_text(&c.raw);
        if fixed != c.fix_text {
            failures.push(format!(
                "fix_text {}: ours {} python {}",
                show(&c.raw),
                show(&fixed),
                show(&c.fix_text)
            ));
        }
        let cleaned = clean_prompt(&c.raw);
        if cleaned != c.clean {
            failures.push(format!(
                "clean {}: ours {} python {}",
                show(&c.raw),
                show(&cleaned),
                show(&c.clean)
            ));
        }
    }
    println!(
        "{} cleaning cases, {} mismatches",
        cases.len(),
        failures.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn tokenizer_ids_match_transformers() {
    let cases: Vec<TokenizerCase> = read("tokenizer_cases.json");
    let tok = Tokenizer::from_file(&fixtures().join("tokenizer/tokenizer.json")).unwrap();
    // The folder form (diffusers `tokenizer/`) finds the same file.
    let from_dir = Tokenizer::from_file(&fixtures().join("tokenizer")).unwrap();
    assert_eq!(tok.vocab_size(), from_dir.vocab_size());
    let mut truncated = 0;
    for c in &cases {
        let cleaned = clean_prompt(&c.prompt);
        assert_eq!(cleaned, c.cleaned, "cleaning of {}", show(&c.prompt));
        let batch = tok.encode_batch(&[cleaned.as_str()], TEXT_LEN).unwrap();
        let ids: Vec<i64> = batch.input_ids.get(0).unwrap().to_vec1().unwrap();
        let mask: Vec<i64> = batch.attention_mask.get(0).unwrap().to_vec1().unwrap();
        assert_eq!(batch.lengths[0], c.length, "length of {}", show(&c.prompt));
        assert_eq!(&ids[..c.length], &c.ids[..], "ids of {}", show(&c.prompt));
        assert!(ids[c.length..].iter().all(|&i| i == 0), "padding id 0");
        assert!(
            mask[..c.length].iter().all(|&m| m == 1) && mask[c.length..].iter().all(|&m| m == 0)
        );
        assert_eq!(*c.ids.last().unwrap(), 1, "EOS last");
        if c.length == TEXT_LEN {
            truncated += 1;
        }
    }
    println!(
        "{} tokenizer cases equal ({} truncated at 512 with EOS kept)",
        cases.len(),
        truncated
    );
    assert!(truncated >= 2, "the fixture must exercise truncation");
}

#[test]
fn missing_tokenizer_is_a_clear_error() {
    let err = Tokenizer::from_file(Path::new("/nonexistent/tokenizer"))
        .err()
        .unwrap();
    assert!(vidgen_engine::error::is_invalid_input(&err), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let err = Tokenizer::from_file(dir.path()).err().unwrap();
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
}
