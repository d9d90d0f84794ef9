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

/// Two dequantised values compared bit for bit, except that +0 and −0 count as the same value.
/// candle's CUDA Q4_0 kernel computes `d·q − 8d`, which is +0 where the CPU's `(q − 8)·d` is −0
/// (a negative scale); every later product or sum with a non-zero term is then identical.
/// Returns (values that differ, values that differ only in the sign of zero).
pub fn dequantized_mismatches(a: &[f32], b: &[f32]) -> (usize, usize) {
    let mut differ = 0;
    let mut zero_sign = 0;
    for (x, y) in a.iter().zip(b) {
        if x.to_bits() == y.to_bits() {
            continue;
        }
        if *x == 0.0 && *y == 0.0 {
            zero_sign += 1;
        } else {
            differ += 1;
        }
    }
    differ += a.len().abs_diff(b.len());
    (differ, zero_sign)
}

#[cfg(test)]
mod tests {
    use super::dequantized_mismatches;

    #[test]
    fn zero_sign_is_counted_apart_from_real_differences() {
        assert_eq!(dequantized_mismatches(&[-0.0, 1.0], &[0.0, 1.0]), (0, 1));
        assert_eq!(
            dequantized_mismatches(&[0.5, 1.0], &[0.5, 1.0 + f32::EPSILON]),
            (1, 0)
        );
        assert_eq!(dequantized_mismatches(&[0.5], &[0.5, 0.0]), (1, 0));
        assert_eq!(dequantized_mismatches(&[f32::NAN], &[f32::NAN]), (0, 0));
    }
}
