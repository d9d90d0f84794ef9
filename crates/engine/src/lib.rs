//! vidgen-engine: runs Wan-family video diffusion models natively (candle), with no HTTP.
//!
//! Layout (one module per component, as in diffusers):
//! - [`weights`]: checkpoint loading (safetensors, sharded indexes, PyTorch `.pth`), strict keys.
//! - [`dit`]: the Wan diffusion transformer.
//! - [`scheduler`]: flow-matching schedulers (UniPC, Euler, DPM-Solver++).
//! - [`denoise`]: the sampling loop (CFG, A14B expert switch).
//! - [`vae`]: Wan VAE 2.1 / 2.2.
//! - [`text`]: UMT5 encoder, tokenizer, prompt cleaning.
//! - [`component`]: the `run-component` contract shared by the CLI and the tests.

pub(crate) mod blaslt;
pub mod component;
#[cfg(feature = "cuda")]
pub(crate) mod cuda_util;
pub mod denoise;
pub mod device;
pub mod dit;
pub mod error;
pub mod memory;
pub mod pipeline;
pub mod presets;
pub mod profile;
pub mod rng;
pub mod scheduler;
pub mod tensor_util;
pub mod text;
pub mod vae;
pub mod weights;

pub use error::InvalidInput;
