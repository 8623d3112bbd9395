//! Optimizers over a [`ParamStore`], written here rather than taken from candle-nn because ZeRO
//! needs states for only this rank's shard. States take the weights' dtype: fp32 for fp32 and
//! mixed precision (fp32 weights), bf16 in true bf16 (no fp32 master copy, as torch AdamW on a
//! `model.to(torch.bfloat16)`).
//! Update rules and defaults follow PyTorch: AdamW (lr 1e-3, betas 0.9/0.999, eps 1e-8,
//! weight decay 1e-2), SGD with momentum 0.9, plain SGD (lr 1e-2).
//!
//! ZeRO: with stage >= 1 the states cover only rank 0's shard rows of each parameter and only
//! those rows are updated (the other rows would arrive by all-gather from the other ranks).

use super::layers::ParamStore;
use super::update;
use crate::spec::Optimizer;
use candle_core::{Result, Tensor, Var};

struct State {
    /// AdamW first moment, or the momentum buffer.
    m: Option<Var>,
    /// AdamW second moment.
    v: Option<Var>,
}

pub struct Optim {
    kind: Optimizer,
    lr: f64,
    steps: u64,
    states: Vec<State>,
}

fn shard_shape(shape: &[usize], rows: usize) -> Vec<usize> {
    let mut s = shape.to_vec();
    s[0] = rows;
    s
}

impl Optim {
    /// Allocates the states (in the weights' dtype) for every parameter's shard. 8-bit AdamW
    /// is planner-only: the trainer refuses it before building an optimizer.
    pub fn new(kind: Optimizer, store: &ParamStore) -> Result<Self> {
        let lr = match kind {
            Optimizer::AdamW | Optimizer::AdamW8bit => 1e-3,
            Optimizer::SgdMomentum | Optimizer::Sgd => 1e-2,
        };
        let mut states = Vec::with_capacity(store.params.len());
        for p in &store.params {
            if !p.trainable {
                // a frozen base weight has no optimizer state
                states.push(State { m: None, v: None });
                continue;
            }
            let shape = shard_shape(&p.shape, p.shard_rows);
            let zeros = || Var::zeros(shape.clone(), store.dtype, &store.device);
            states.push(State {
                m: (kind.states_per_param() >= 1).then(zeros).transpose()?,
                v: (kind.states_per_param() >= 2).then(zeros).transpose()?,
            });
        }
        Ok(Self {
            kind,
            lr,
            steps: 0,
            states,
        })
    }

    /// Every state tensor (moments, momentum buffers), for inspection.
    pub fn states(&self) -> impl Iterator<Item = &Var> {
        self.states
            .iter()
            .flat_map(|s| s.m.iter().chain(s.v.iter()))
    }

    /// Applies one update from `grads` (indexed like `store.params`; full or shard rows), in
    /// place as PyTorch's for-loop implementations update ([`super::update`]): AdamW allocates
    /// only its denominator (`exp_avg_sq.sqrt()`, then its quotient by the bias correction: two
    /// copies of the tensor at once), SGD with or without momentum nothing.
    pub fn step(&mut self, store: &ParamStore, grads: &[Option<Tensor>]) -> Result<()> {
        self.steps += 1;
        let t = self.steps as i32;
        for ((p, st), g) in store.params.iter().zip(&self.states).zip(grads) {
            let Some(g) = g else { continue };
            let k = p.shard_rows;
            // the update runs in the weights' dtype, as torch's AdamW does on bf16 parameters
            let g = g.narrow(0, 0, k)?.to_dtype(p.var.dtype())?.contiguous()?;
            // this rank's rows of the weight, a view sharing the Var's storage
            let w = p.var.as_tensor().narrow(0, 0, k)?;
            match self.kind {
                Optimizer::AdamW | Optimizer::AdamW8bit => {
                    let (b1, b2, eps, wd) = (0.9, 0.999, 1e-8, 1e-2);
                    let m = st.m.as_ref().expect("adam m").as_tensor();
                    let v = st.v.as_ref().expect("adam v").as_tensor();
                    update::axpby(m, b1, 1.0 - b1, &g)?;
                    update::axpby_square(v, b2, 1.0 - b2, &g)?;
                    let bias1 = 1.0 - b1.powi(t);
                    let bias2_sqrt = (1.0 - b2.powi(t)).sqrt();
                    let denom = v.sqrt()?.affine(1.0 / bias2_sqrt, eps)?;
                    update::addcdiv(&w, 1.0 - self.lr * wd, -self.lr / bias1, m, &denom)?;
                }
                Optimizer::SgdMomentum => {
                    let m = st.m.as_ref().expect("momentum buffer").as_tensor();
                    update::axpby(m, 0.9, 1.0, &g)?;
                    update::axpby(&w, 1.0, -self.lr, m)?;
                }
                Optimizer::Sgd => update::axpby(&w, 1.0, -self.lr, &g)?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::harness::layers::params::Init;
    use candle_core::{DType, Device};

    /// The update equals PyTorch's AdamW in closed form on the first step (m_hat = g,
    /// v_hat = g^2, so the step is lr * g / (|g| + eps) plus decoupled weight decay).
    #[test]
    fn adamw_matches_the_closed_form_first_step() {
        let dev = Device::Cpu;
        let mut store = ParamStore::new(&dev, DType::F32, 7, 0, 1);
        let rows = 300;
        let idx = store.add("w", &[rows, 512], Init::Uniform(0.02)).unwrap();
        let values = |store: &ParamStore| -> Vec<f32> {
            let t = store.params[idx].var.as_tensor().flatten_all().unwrap();
            t.to_vec1::<f32>().unwrap()
        };
        let before = values(&store);
        let g = Tensor::full(0.5f32, (rows, 512), &dev).unwrap();
        let mut opt = Optim::new(Optimizer::AdamW, &store).unwrap();
        opt.step(&store, &[Some(g)]).unwrap();
        let after = values(&store);
        for (b, a) in before.iter().zip(&after) {
            let want = b * (1.0 - 1e-3 * 1e-2) - 1e-3 * 0.5 / (0.5 + 1e-8);
            assert!((a - want).abs() < 1e-6, "{a} vs {want}");
        }
    }
}
