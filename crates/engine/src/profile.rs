//! Opt-in per-operation timing (`VIDGEN_PROFILE=1`): each named scope synchronises the device
//! before and after, so GPU time is attributed to the scope that spent it. Off by default (the
//! synchronisations cost throughput); `vidgen bench` prints the table when it is on. Nested scopes
//! are each counted in full. On the GPU each scope also records its working memory: how far the
//! memory pool's high-water mark rose above the bytes in use when the scope began (so the scope
//! that sets a stage's peak, and by how much, can be read off the table).

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use anyhow::Result;
use candle_core::Device;

fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("VIDGEN_PROFILE").is_ok_and(|v| v == "1"))
}

/// What one scope spent since the last [`take`].
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ScopeStats {
    pub seconds: f64,
    pub calls: u64,
    /// The most the device pool's high-water mark rose above the bytes in use at a call's start,
    /// over the calls that raised it (0 on the CPU, or when an earlier peak was never exceeded).
    pub working_bytes: u64,
}

static TABLE: Mutex<BTreeMap<&'static str, ScopeStats>> = Mutex::new(BTreeMap::new());

/// Runs `f`, adding its synchronised wall time (and working memory) to `name` when profiling is on.
pub fn scope<T>(name: &'static str, device: &Device, f: impl FnOnce() -> Result<T>) -> Result<T> {
    if !enabled() {
        return f();
    }
    device.synchronize()?;
    let before = crate::device::gpu_memory::usage(device)?;
    let t0 = Instant::now();
    let out = f()?;
    device.synchronize()?;
    let seconds = t0.elapsed().as_secs_f64();
    let after = crate::device::gpu_memory::usage(device)?;
    let working = match (before, after) {
        (Some(b), Some(a)) if a.peak > b.peak => a.peak - b.used,
        _ => 0,
    };
    let mut table = TABLE.lock().unwrap_or_else(|e| e.into_inner());
    let entry = table.entry(name).or_default();
    entry.seconds += seconds;
    entry.calls += 1;
    entry.working_bytes = entry.working_bytes.max(working);
    Ok(out)
}

/// Each scope's totals since the last call, and resets the table. Empty when off.
pub fn take() -> Vec<(&'static str, ScopeStats)> {
    let mut table = TABLE.lock().unwrap_or_else(|e| e.into_inner());
    std::mem::take(&mut *table).into_iter().collect()
}
