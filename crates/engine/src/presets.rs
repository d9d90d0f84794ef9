//! Per-model defaults from the official Wan configs (steps, shift, guidance, boundary, fps, frames, sizes).
