//! Pipelines: text-to-video, image-to-video, text-image-to-video, and the request contract.
//!
//! The request types and their validation are shared by `vidgen generate`, the server and the
//! worker. The stages ([`stages`]) wire text encoder → DiT(s) → VAE, releasing each
//! component's memory after its stage.

pub mod demo;
pub mod events;
pub mod image;
pub mod layout;
pub mod request;
pub mod stages;

pub use events::{NoProgress, ProgressEvent, ProgressSink, Stage};
pub use request::{GenerateRequest, ModelInfo, ResolvedRequest, Task};
