//! placeholder during development
pub fn clean_prompt(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}
