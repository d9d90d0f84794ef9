//! Compact frame-range text for messages: `0-3, 7, 9-80`.

/// Formats sorted frame indices as ranges, e.g. `[0, 1, 2, 3, 7]` → `"0-3, 7"`.
pub fn format_ranges(indices: &[usize]) -> String {
    let mut parts = Vec::new();
    let mut iter = indices.iter().copied().peekable();
    while let Some(start) = iter.next() {
        let mut end = start;
        while iter.peek() == Some(&(end + 1)) {
            end = iter.next().unwrap_or(end);
        }
        parts.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
    }
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::format_ranges;

    #[test]
    fn ranges_are_compact() {
        assert_eq!(format_ranges(&[]), "");
        assert_eq!(format_ranges(&[5]), "5");
        assert_eq!(format_ranges(&[0, 1, 2, 3, 7, 9, 10]), "0-3, 7, 9-10");
    }
}
