//! Small tensor helpers shared by components and tests.

use anyhow::Result;
use candle_core::{DType, Tensor};

/// Relative error ‖a − b‖ / ‖b‖ in f64 (b is the reference).
pub fn rel_err(ours: &Tensor, reference: &Tensor) -> Result<f64> {
    anyhow::ensure!(
        ours.dims() == reference.dims(),
        "shape mismatch: ours {:?} vs reference {:?}",
        ours.dims(),
        reference.dims()
    );
    let a = ours.to_dtype(DType::F64)?.flatten_all()?;
    let b = reference.to_dtype(DType::F64)?.flatten_all()?;
    let diff = (a - &b)?.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    let norm = b.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    Ok(if norm == 0.0 { diff } else { diff / norm })
}

/// Largest absolute difference.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    let d = (a.to_dtype(DType::F64)? - b.to_dtype(DType::F64)?)?.abs()?;
    Ok(d.flatten_all()?.max(0)?.to_scalar::<f64>()?)
}
