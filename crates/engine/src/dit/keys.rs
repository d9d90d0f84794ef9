//! Checkpoint key layouts. The canonical names are diffusers' (`WanTransformer3DModel`); official
//! Wan names (`blocks.0.self_attn.q.weight`) are rewritten with the conversion table of diffusers'
//! `scripts/convert_wan_to_diffusers.py` (wan-facts §4), and ComfyUI repacks lose their
//! `model.diffusion_model.` / `model.` prefix.

/// The key layout a checkpoint uses, detected from its names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyLayout {
    Diffusers,
    Official,
}

const COMFY_PREFIXES: &[&str] = &["model.diffusion_model.", "diffusion_model.", "model."];

fn strip_prefix(key: &str) -> &str {
    COMFY_PREFIXES
        .iter()
        .find_map(|p| key.strip_prefix(p))
        .unwrap_or(key)
}

/// Detects the layout from stored keys (after prefix stripping).
pub fn detect_layout<'a>(keys: impl IntoIterator<Item = &'a String>) -> KeyLayout {
    for k in keys {
        let k = strip_prefix(k);
        if k.starts_with("head.head.")
            || k.contains(".self_attn.")
            || k.starts_with("text_embedding.")
        {
            return KeyLayout::Official;
        }
    }
    KeyLayout::Diffusers
}

/// Official substring → diffusers substring, applied in order (norm2/norm3 swap through a placeholder).
const OFFICIAL_TO_DIFFUSERS: &[(&str, &str)] = &[
    (
        "time_embedding.0",
        "condition_embedder.time_embedder.linear_1",
    ),
    (
        "time_embedding.2",
        "condition_embedder.time_embedder.linear_2",
    ),
    (
        "text_embedding.0",
        "condition_embedder.text_embedder.linear_1",
    ),
    (
        "text_embedding.2",
        "condition_embedder.text_embedder.linear_2",
    ),
    ("time_projection.1", "condition_embedder.time_proj"),
    ("head.modulation", "scale_shift_table"),
    ("head.head", "proj_out"),
    ("modulation", "scale_shift_table"),
    ("ffn.0", "ffn.net.0.proj"),
    ("ffn.2", "ffn.net.2"),
    ("norm2", "norm__placeholder"),
    ("norm3", "norm2"),
    ("norm__placeholder", "norm3"),
    ("self_attn.q", "attn1.to_q"),
    ("self_attn.k", "attn1.to_k"),
    ("self_attn.v", "attn1.to_v"),
    ("self_attn.o", "attn1.to_out.0"),
    ("self_attn.norm_q", "attn1.norm_q"),
    ("self_attn.norm_k", "attn1.norm_k"),
    ("cross_attn.q", "attn2.to_q"),
    ("cross_attn.k", "attn2.to_k"),
    ("cross_attn.v", "attn2.to_v"),
    ("cross_attn.o", "attn2.to_out.0"),
    ("cross_attn.norm_q", "attn2.norm_q"),
    ("cross_attn.norm_k", "attn2.norm_k"),
];

/// Canonical (diffusers) name of a stored key.
pub fn canonical_name(key: &str, layout: KeyLayout) -> String {
    let key = strip_prefix(key);
    match layout {
        KeyLayout::Diffusers => key.to_string(),
        KeyLayout::Official => {
            let mut k = key.to_string();
            for (from, to) in OFFICIAL_TO_DIFFUSERS {
                if k.contains(from) {
                    k = k.replace(from, to);
                }
            }
            k
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn official_names_map_to_diffusers() {
        let cases = [
            ("blocks.3.self_attn.q.weight", "blocks.3.attn1.to_q.weight"),
            (
                "blocks.3.self_attn.norm_q.weight",
                "blocks.3.attn1.norm_q.weight",
            ),
            ("blocks.3.cross_attn.o.bias", "blocks.3.attn2.to_out.0.bias"),
            ("blocks.3.norm3.weight", "blocks.3.norm2.weight"),
            ("blocks.3.modulation", "blocks.3.scale_shift_table"),
            ("blocks.3.ffn.0.weight", "blocks.3.ffn.net.0.proj.weight"),
            ("blocks.3.ffn.2.bias", "blocks.3.ffn.net.2.bias"),
            ("head.modulation", "scale_shift_table"),
            ("head.head.weight", "proj_out.weight"),
            (
                "time_projection.1.weight",
                "condition_embedder.time_proj.weight",
            ),
            (
                "text_embedding.2.bias",
                "condition_embedder.text_embedder.linear_2.bias",
            ),
            (
                "model.diffusion_model.patch_embedding.weight",
                "patch_embedding.weight",
            ),
        ];
        for (official, diffusers) in cases {
            assert_eq!(
                canonical_name(official, KeyLayout::Official),
                diffusers,
                "{official}"
            );
        }
        let keys = vec!["model.diffusion_model.head.head.weight".to_string()];
        assert_eq!(detect_layout(&keys), KeyLayout::Official);
        let keys = vec!["proj_out.weight".to_string()];
        assert_eq!(detect_layout(&keys), KeyLayout::Diffusers);
    }
}
