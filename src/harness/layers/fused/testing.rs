//! Test helpers of the fused ops: seeded inputs and the fused-against-composed comparison.

use candle_core::{DType, Device, Result, Tensor, Var};

pub(super) fn rand(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let mut rng = crate::harness::layers::params::FastRng::new(seed);
    let v: Vec<f32> = (0..n)
        .map(|_| (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

pub(super) fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    crate::harness::compare::max_rel_err(a, b).unwrap()
}

/// Runs `fused` and `reference` on Vars made from `inputs`, back-propagates the same random
/// projection of the output through both, and compares output and gradients.
pub(super) fn same(
    inputs: &[Tensor],
    fused: impl Fn(&[Tensor]) -> Result<Tensor>,
    reference: impl Fn(&[Tensor]) -> Result<Tensor>,
) {
    close(inputs, fused, reference, 1e-5)
}

/// [`same`] within the relative error `tol` (half-precision inputs).
pub(super) fn close(
    inputs: &[Tensor],
    fused: impl Fn(&[Tensor]) -> Result<Tensor>,
    reference: impl Fn(&[Tensor]) -> Result<Tensor>,
    tol: f32,
) {
    let run = |f: &dyn Fn(&[Tensor]) -> Result<Tensor>| {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let y = f(&ts).unwrap();
        let r = rand(y.dims(), 99).to_dtype(y.dtype()).unwrap();
        let loss = (y.to_dtype(DType::F32).unwrap() * r.to_dtype(DType::F32).unwrap())
            .unwrap()
            .sum_all()
            .unwrap();
        let gs = loss.backward().unwrap();
        let grads: Vec<Tensor> = vars.iter().map(|v| gs.get(v).unwrap().clone()).collect();
        (y, grads)
    };
    let (yf, gf) = run(&fused);
    let (yr, gr) = run(&reference);
    assert_eq!(yf.dims(), yr.dims());
    assert!(rel_err(&yf, &yr) < tol, "output {}", rel_err(&yf, &yr));
    for (i, (a, b)) in gf.iter().zip(&gr).enumerate() {
        assert_eq!(a.dims(), b.dims(), "grad {i}");
        assert!(rel_err(a, b) < tol, "grad {i}: {}", rel_err(a, b));
    }
}
