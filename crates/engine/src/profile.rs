//! Opt-in per-operation timing (`VIDGEN_PROFILE=1`): each named scope synchronises the device
//! before and after, so GPU time is attributed to the scope that spent it. Off by default (the
//! synchronisations cost throughput); `vidgen bench` prints the table when it is on. Nested scopes
//! are each counted in full.

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use anyhow::Result;
use candle_core::Device;

fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("VIDGEN_PROFILE").is_ok_and(|v| v == "1"))
}

static TABLE: Mutex<BTreeMap<&'static str, (f64, u64)>> = Mutex::new(BTreeMap::new());

/// Runs `f`, adding its synchronised wall time to `name` when profiling is on.
pub fn scope<T>(name: &'static str, device: &Device, f: impl FnOnce() -> Result<T>) -> Result<T> {
    if !enabled() {
        return f();
    }
    device.synchronize()?;
    let t0 = Instant::now();
    let out = f()?;
    device.synchronize()?;
    let mut table = TABLE.lock().unwrap_or_else(|e| e.into_inner());
    let entry = table.entry(name).or_insert((0.0, 0));
    entry.0 += t0.elapsed().as_secs_f64();
    entry.1 += 1;
    Ok(out)
}

/// Seconds and calls per scope since the last call, and resets the table. Empty when off.
pub fn take() -> Vec<(&'static str, f64, u64)> {
    let mut table = TABLE.lock().unwrap_or_else(|e| e.into_inner());
    std::mem::take(&mut *table)
        .into_iter()
        .map(|(k, (s, n))| (k, s, n))
        .collect()
}
