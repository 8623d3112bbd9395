//! Non-negative least squares (Lawson & Hanson 1974, "Solving Least Squares Problems", ch. 23):
//! minimise |W (A x - b)| subject to x >= 0.
//!
//! Why NNLS: every memory coefficient is a byte count per element (or a fraction of bytes), and a
//! negative value would let one feature cancel another, which fits noise and extrapolates badly.
//! The unconstrained sub-problems on the passive set are solved with nalgebra's SVD.
//!
//! Why column scaling: the features span ~15 orders of magnitude (a constant column of 1 next to
//! b*a*s^2 counts of 10^9); unit-norm columns keep the active-set tests and the SVD well
//! conditioned. Why optional row weights: with `1/measured` weights the fit minimises relative
//! error, which is what MAPE scores, instead of letting the largest configurations dominate.

use nalgebra::{DMatrix, DVector};

/// Result of a weighted, scaled NNLS fit, in the caller's (unscaled) units.
#[derive(Debug, Clone)]
pub struct NnlsFit {
    pub x: DVector<f64>,
    /// Norm of the weighted residual `W (A x - b)`.
    pub residual_norm: f64,
    /// Active-set iterations used.
    pub iterations: usize,
}

/// Plain Lawson-Hanson NNLS on an already scaled problem.
pub fn nnls(a: &DMatrix<f64>, b: &DVector<f64>) -> anyhow::Result<(DVector<f64>, usize)> {
    let n = a.ncols();
    anyhow::ensure!(
        a.nrows() == b.len(),
        "NNLS: {} rows but {} targets",
        a.nrows(),
        b.len()
    );
    let mut x = DVector::<f64>::zeros(n);
    let mut passive = vec![false; n];
    let scale = a.norm().max(1e-300) * b.norm().max(1e-300);
    let tol = 1e-12 * scale.max(1.0);
    let max_iter = 30 * n.max(1) + 100;
    let mut iterations = 0;
    loop {
        let w = a.transpose() * (b - a * &x);
        // Most promising column still held at zero.
        let next = (0..n)
            .filter(|&j| !passive[j] && w[j] > tol)
            .max_by(|&i, &j| w[i].total_cmp(&w[j]));
        let Some(j) = next else { break };
        passive[j] = true;
        loop {
            iterations += 1;
            anyhow::ensure!(
                iterations <= max_iter,
                "NNLS did not converge in {max_iter} iterations"
            );
            let s = solve_passive(a, b, &passive)?;
            if (0..n).filter(|&i| passive[i]).all(|i| s[i] > 0.0) {
                x = s;
                break;
            }
            // Step from x towards s until the first passive variable reaches zero.
            let alpha = (0..n)
                .filter(|&i| passive[i] && s[i] <= 0.0)
                .map(|i| x[i] / (x[i] - s[i]))
                .fold(f64::INFINITY, f64::min);
            x += (s - &x) * alpha;
            for i in 0..n {
                if passive[i] && x[i] <= 1e-15 * x.amax().max(1.0) {
                    passive[i] = false;
                    x[i] = 0.0;
                }
            }
        }
        if passive.iter().all(|&p| p) {
            break;
        }
    }
    Ok((x, iterations))
}

/// Unconstrained least squares on the passive columns (SVD), zeros elsewhere.
fn solve_passive(
    a: &DMatrix<f64>,
    b: &DVector<f64>,
    passive: &[bool],
) -> anyhow::Result<DVector<f64>> {
    let cols: Vec<usize> = (0..a.ncols()).filter(|&j| passive[j]).collect();
    let sub = a.select_columns(&cols);
    let sol = sub
        .svd(true, true)
        .solve(b, 1e-12)
        .map_err(|e| anyhow::anyhow!("NNLS sub-problem: {e}"))?;
    let mut full = DVector::zeros(a.ncols());
    for (k, &j) in cols.iter().enumerate() {
        full[j] = sol[k];
    }
    Ok(full)
}

/// NNLS with unit-norm column scaling and optional per-row weights (e.g. `1/measured` to
/// minimise relative error). All-zero columns are left at 0.
pub fn fit(a: &DMatrix<f64>, b: &DVector<f64>, weights: Option<&[f64]>) -> anyhow::Result<NnlsFit> {
    let (m, n) = a.shape();
    anyhow::ensure!(b.len() == m, "NNLS: {m} rows but {} targets", b.len());
    if let Some(w) = weights {
        anyhow::ensure!(w.len() == m, "NNLS: {m} rows but {} weights", w.len());
        anyhow::ensure!(
            w.iter().all(|v| v.is_finite() && *v >= 0.0),
            "NNLS: weights must be finite and >= 0"
        );
    }
    anyhow::ensure!(
        a.iter().chain(b.iter()).all(|v| v.is_finite()),
        "NNLS: non-finite input"
    );
    let mut aw = a.clone();
    let mut bw = b.clone();
    if let Some(w) = weights {
        for i in 0..m {
            aw.row_mut(i).scale_mut(w[i]);
            bw[i] *= w[i];
        }
    }
    let norms: Vec<f64> = (0..n).map(|j| aw.column(j).norm()).collect();
    for (j, &nj) in norms.iter().enumerate() {
        if nj > 0.0 {
            aw.column_mut(j).unscale_mut(nj);
        }
    }
    let (xs, iterations) = nnls(&aw, &bw)?;
    let x = DVector::from_iterator(
        n,
        (0..n).map(|j| {
            if norms[j] > 0.0 {
                xs[j] / norms[j]
            } else {
                0.0
            }
        }),
    );
    let mut r = a * &x - b;
    if let Some(w) = weights {
        for i in 0..m {
            r[i] *= w[i];
        }
    }
    Ok(NnlsFit {
        x,
        residual_norm: r.norm(),
        iterations,
    })
}

/// Singular values of the weighted, column-normalised design, largest first: a ratio near zero
/// means some combination of features cannot be told apart by this data.
pub fn scaled_singular(a: &DMatrix<f64>, weights: Option<&[f64]>) -> (DVector<f64>, DMatrix<f64>) {
    let mut aw = a.clone();
    if let Some(w) = weights {
        for (i, wi) in w.iter().enumerate() {
            aw.row_mut(i).scale_mut(*wi);
        }
    }
    for j in 0..aw.ncols() {
        let nj = aw.column(j).norm();
        if nj > 0.0 {
            aw.column_mut(j).unscale_mut(nj);
        }
    }
    let svd = aw.svd(false, true);
    let v_t = svd.v_t.expect("requested V^T");
    (svd.singular_values, v_t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_solution_when_feasible() {
        let a = DMatrix::from_row_slice(4, 2, &[1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 2.0, 1.0]);
        let x_true = DVector::from_vec(vec![3.0, 2.0]);
        let b = &a * &x_true;
        let f = fit(&a, &b, None).unwrap();
        assert!(
            (f.x[0] - 3.0).abs() < 1e-9 && (f.x[1] - 2.0).abs() < 1e-9,
            "{:?}",
            f.x
        );
    }

    #[test]
    fn clamps_negative_coefficient_to_zero() {
        // Unconstrained optimum has x1 < 0; NNLS must return x1 = 0 and refit x0 alone.
        let a = DMatrix::from_row_slice(3, 2, &[1.0, 1.0, 2.0, 1.0, 3.0, 1.0]);
        let b = DVector::from_vec(vec![1.0, 3.0, 5.0]); // = 2*col0 - 1*col1
        let f = fit(&a, &b, None).unwrap();
        assert_eq!(f.x[1], 0.0);
        // least squares of b on col0 alone: (1+6+15)/(1+4+9) = 22/14
        assert!((f.x[0] - 22.0 / 14.0).abs() < 1e-9, "{:?}", f.x);
    }
}
