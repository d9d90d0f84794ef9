//! `weights::fp8_matmul` on inputs whose FP8 form is exact, so the expected product is known
//! independently of the quantiser: values on the e4m3 grid, each row's largest magnitude 448·2^e
//! (its scale is then the power of two 2^e, and dividing by it is exact).

use candle_core::{DType, Device, Tensor};
use vidgen_engine::weights::fp8::FP8_E4M3_MAX;
use vidgen_engine::weights::fp8::{Fp8Granularity, Fp8Weight};
use vidgen_engine::weights::fp8_matmul::{fp8_linear, quantize_rows, Activation};

/// Every finite non-negative e4m3 value up to 448 from 2^min_exp (3 mantissa bits, exponents
/// -6..8; `min_exp` -6 adds the subnormals).
fn e4m3_grid(min_exp: i32) -> Vec<f32> {
    let mut v = vec![0.0];
    if min_exp <= -6 {
        for m in 1..8 {
            v.push(m as f32 / 8.0 * 2f32.powi(-6)); // subnormals
        }
    }
    for e in min_exp.max(-6)..=8 {
        for m in 0..8 {
            let x = (1.0 + m as f32 / 8.0) * 2f32.powi(e);
            if x <= FP8_E4M3_MAX {
                v.push(x);
            }
        }
    }
    v
}

/// `rows x cols` values from `grid` with varied signs, each row holding ±448 once, scaled row by
/// row by 2^exps[r].
fn exact_matrix(
    grid: &[f32],
    rows: usize,
    cols: usize,
    seed: u64,
    exps: impl Fn(usize) -> i32,
) -> Vec<f32> {
    let mut state = seed;
    let mut next = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) as usize
    };
    let mut out = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        let scale = 2f32.powi(exps(r));
        let peak = next() % cols;
        for c in 0..cols {
            let magnitude = if c == peak {
                FP8_E4M3_MAX
            } else {
                grid[next() % grid.len()]
            };
            let sign = if next() % 2 == 0 { 1.0 } else { -1.0 };
            out.push(sign * magnitude * scale);
        }
    }
    out
}

#[test]
fn quantize_rows_keeps_exact_values_and_power_of_two_scales() {
    let (rows, k) = (5, 48);
    let x = exact_matrix(&e4m3_grid(-6), rows, k, 1, |r| r as i32 - 2);
    let t = Tensor::from_vec(x.clone(), (rows, k), &Device::Cpu).unwrap();
    let q = quantize_rows(&t).unwrap();
    let scales: Vec<f32> = q.scale().to_vec1().unwrap();
    for (r, s) in scales.iter().enumerate() {
        assert_eq!(*s, 2f32.powi(r as i32 - 2), "row {r}: scale");
    }
    let back: Vec<f32> = q
        .dequantize(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(back, x, "grid values must survive quantisation exactly");

    // An all-zero row keeps scale 1 and zeros.
    let zeros = Tensor::zeros((2, 16), DType::F32, &Device::Cpu).unwrap();
    let qz = quantize_rows(&zeros).unwrap();
    assert_eq!(qz.scale().to_vec1::<f32>().unwrap(), [1.0, 1.0]);
}

#[test]
fn fp8_linear_equals_the_exact_product_on_grid_inputs() {
    // The grid's integers (8..448) times a power of two per row: every partial sum of a row ·
    // column product is an integer below 448² · 32 < 2^24 times one common power of two, exact
    // in f32 whatever the summation order.
    let grid = e4m3_grid(3);
    let (rows, k, out) = (7, 32, 48);
    let x = exact_matrix(&grid, rows, k, 2, |r| -(r as i32 % 3));
    let w = exact_matrix(&grid, out, k, 3, |r| -4 - (r as i32 % 2));
    let b: Vec<f32> = (0..out).map(|i| i as f32 * 0.25 - 3.0).collect();
    let dev = Device::Cpu;
    let xt = Tensor::from_vec(x.clone(), (1, rows, k), &dev).unwrap();
    let wt = Tensor::from_vec(w.clone(), (out, k), &dev).unwrap();
    let bt = Tensor::from_vec(b.clone(), out, &dev).unwrap();
    let wq = Fp8Weight::quantize(&wt, Fp8Granularity::PerChannel).unwrap();
    let y: Vec<f32> = fp8_linear(&xt, &wq, &bt, Activation::None)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(y.len(), rows * out);
    for r in 0..rows {
        for c in 0..out {
            let exact: f64 = (0..k)
                .map(|i| x[r * k + i] as f64 * w[c * k + i] as f64)
                .sum::<f64>()
                + b[c] as f64;
            assert_eq!(y[r * out + c] as f64, exact, "row {r}, column {c}");
        }
    }

    // The GELU variant applies PyTorch's tanh approximation after the bias.
    let g: Vec<f32> = fp8_linear(&xt, &wq, &bt, Activation::GeluTanh)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    for (gi, yi) in g.iter().zip(&y) {
        let v = *yi as f64;
        let gelu = 0.5
            * v
            * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (v + 0.044715 * v * v * v)).tanh());
        assert!(
            (*gi as f64 - gelu).abs() <= 1e-5 * gelu.abs().max(1.0),
            "{gi} vs {gelu}"
        );
    }
}

#[test]
fn fp8_linear_on_random_inputs_stays_near_the_dense_product() {
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (3, 40, 64), &dev).unwrap();
    let w = (Tensor::randn(0f32, 1.0, (32, 64), &dev).unwrap() * 0.1).unwrap();
    let b = Tensor::randn(0f32, 1.0, 32, &dev).unwrap();
    let wq = Fp8Weight::quantize(&w, Fp8Granularity::PerChannel).unwrap();
    let y = fp8_linear(&x, &wq, &b, Activation::None).unwrap();
    assert_eq!(y.dims(), [3, 40, 32]);
    let dense = x
        .broadcast_matmul(&w.t().unwrap())
        .unwrap()
        .broadcast_add(&b)
        .unwrap();
    let err = vidgen_engine::tensor_util::rel_err(&y, &dense).unwrap();
    // Two e4m3 roundings (3 mantissa bits each) per product, averaged over 64 terms.
    assert!(err > 1e-4 && err < 5e-2, "rel err {err}");

    // Mis-shaped inputs are errors that name the shapes.
    let e = fp8_linear(&x.narrow(2, 0, 63).unwrap(), &wq, &b, Activation::None).unwrap_err();
    assert!(e.to_string().contains("do not fit"), "{e}");
}
