//! Parameter storage shared by the transformer and CNN builders: every trainable tensor is a
//! candle `Var` registered here by name, so the trainer can count, shard, update and report them
//! without a second description of the model.
//!
//! ZeRO is simulated on one device as rank 0 of `world` ranks. The shard of a parameter is its
//! first `ceil(rows / world)` rows along dim 0 (a flat slice per tensor, not whole tensors, so that
//! the shard is within one row per tensor of exactly 1/N even when one embedding dominates).
//! Stage 3 keeps only those rows resident; [`Ctx::w_raw`] re-materialises the full weight for the
//! duration of its use by concatenating the resident rows with a freshly allocated fill for the
//! rows other ranks own (what an all-gather would deliver: the values do not matter for memory).

use super::fused;
use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How a parameter starts. Values only matter for numerical sanity (finite losses), not memory.
#[derive(Debug, Clone, Copy)]
pub enum Init {
    /// U(-a, a): linears and convs use a = 1/sqrt(fan_in) (PyTorch's default bound).
    Uniform(f32),
    Ones,
    Zeros,
}

/// One trainable tensor.
#[derive(Debug)]
pub struct Param {
    pub name: String,
    /// Resident storage: the full tensor, or only the shard rows under ZeRO stage 3.
    pub var: Var,
    /// Logical (full-model) shape.
    pub shape: Vec<usize>,
    /// Rows of dim 0 owned by this rank (all rows when not sharded).
    pub shard_rows: usize,
    /// False for a frozen base weight (LoRA): used as a plain tensor (detached: no gradient),
    /// no optimizer state, not counted as trainable.
    pub trainable: bool,
    /// A QLoRA base weight stored as NF4 (then `var` is an empty placeholder of the compute
    /// dtype and the weight is dequantized for each use, [`Ctx::w_raw`]).
    pub nf4: Option<super::nf4::Nf4>,
}

impl Param {
    pub fn rows(&self) -> usize {
        self.shape[0]
    }
    pub fn elems(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product()
    }
    /// True when the resident Var holds fewer rows than the full tensor (ZeRO-3).
    pub fn is_partial(&self) -> bool {
        self.var.dims()[0] < self.rows()
    }
}

/// All parameters of a model, in creation order.
#[derive(Debug)]
pub struct ParamStore {
    pub params: Vec<Param>,
    pub device: Device,
    /// dtype the Vars are held in (fp32, or bf16 for pure-bf16 training).
    pub dtype: DType,
    pub zero_stage: u8,
    pub world: usize,
    /// Set while a LoRA model's base is built: [`ParamStore::add`] then creates frozen
    /// parameters in this dtype (peft's base in the compute dtype); adapters come from
    /// [`ParamStore::add_adapter`].
    pub frozen: Option<DType>,
    /// Set while a QLoRA model's block linears are built: their (2-D, frozen) weights are
    /// stored as NF4.
    pub nf4: bool,
    rng: StdRng,
}

impl ParamStore {
    pub fn new(device: &Device, dtype: DType, seed: u64, zero_stage: u8, world: usize) -> Self {
        Self {
            params: Vec::new(),
            device: device.clone(),
            dtype,
            zero_stage,
            world: world.max(1),
            frozen: None,
            nf4: false,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// Rows of rank 0's shard for a tensor with `rows` rows (all of them below ZeRO stage 1).
    pub fn shard_rows(&self, rows: usize) -> usize {
        if self.zero_stage >= 1 {
            rows.div_ceil(self.world)
        } else {
            rows
        }
    }

    /// Registers a parameter and returns its index. Values come from the store's seeded RNG.
    /// Frozen in the store's `frozen` dtype while that is set.
    pub fn add(
        &mut self,
        name: impl Into<String>,
        shape: &[usize],
        init: Init,
    ) -> anyhow::Result<usize> {
        let frozen = self.frozen;
        self.add_as(name.into(), shape, init, frozen)
    }

    /// Registers a trainable LoRA adapter (in the store's dtype, as peft keeps adapters in fp32
    /// under autocast) whatever `frozen` says.
    pub fn add_adapter(
        &mut self,
        name: impl Into<String>,
        shape: &[usize],
        init: Init,
    ) -> anyhow::Result<usize> {
        self.add_as(name.into(), shape, init, None)
    }

    fn add_as(
        &mut self,
        name: String,
        shape: &[usize],
        init: Init,
        frozen: Option<DType>,
    ) -> anyhow::Result<usize> {
        anyhow::ensure!(!shape.is_empty(), "parameter {name} has no dimensions");
        let shard_rows = self.shard_rows(shape[0]);
        let resident_rows = if self.zero_stage >= 3 {
            shard_rows
        } else {
            shape[0]
        };
        let mut resident = shape.to_vec();
        resident[0] = resident_rows;
        let n: usize = resident.iter().product();
        let values: Vec<f32> = match init {
            Init::Uniform(a) => (0..n).map(|_| self.rng.gen_range(-a..=a)).collect(),
            Init::Ones => vec![1.0; n],
            Init::Zeros => vec![0.0; n],
        };
        let dtype = frozen.unwrap_or(self.dtype);
        if self.nf4 && frozen.is_some() && shape.len() == 2 {
            anyhow::ensure!(
                resident_rows == shape[0],
                "{name}: an NF4 base is not sharded (ZeRO-3)"
            );
            let q = super::nf4::Nf4::quantize(&values, (shape[0], shape[1]), &self.device)?;
            self.params.push(Param {
                name,
                var: Var::from_tensor(&Tensor::zeros(0, dtype, &self.device)?)?,
                shape: shape.to_vec(),
                shard_rows,
                trainable: false,
                nf4: Some(q),
            });
            return Ok(self.params.len() - 1);
        }
        let t = Tensor::from_vec(values, resident, &self.device)?.to_dtype(dtype)?;
        let var = Var::from_tensor(&t)?;
        self.params.push(Param {
            name,
            var,
            shape: shape.to_vec(),
            shard_rows,
            trainable: frozen.is_none(),
            nf4: None,
        });
        Ok(self.params.len() - 1)
    }

    /// Parameters of the full model, from the logical shapes of the allocated Vars.
    pub fn total(&self) -> u64 {
        self.params.iter().map(Param::elems).sum()
    }

    /// Parameters with gradients and optimizer states (all but a frozen base).
    pub fn trainable(&self) -> u64 {
        self.params
            .iter()
            .filter(|p| p.trainable)
            .map(Param::elems)
            .sum()
    }
}

/// Deterministic, fast mask generator (wyrand). Dropout masks must be reproducible so that a
/// checkpointed block recomputes exactly the forward's mask; candle's CPU RNG cannot be seeded.
pub struct FastRng(u64);

impl FastRng {
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x9e37_79b9_7f4a_7c15)
    }
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0xa076_1d64_78bd_642f);
        let t = (self.0 as u128).wrapping_mul((self.0 ^ 0xe703_7ed1_a0b4_28db) as u128);
        ((t >> 64) ^ t) as u64
    }
}

/// Per-forward context: which dtype to compute in, and the dropout seed of this step.
pub struct Ctx<'a> {
    pub store: &'a ParamStore,
    /// Compute dtype (fp32, or bf16/f16 under mixed or pure half precision).
    pub dtype: DType,
    /// Dropout probability; 0 disables dropout.
    pub dropout: f32,
    /// Seed of this step's dropout masks: the same seed gives the same masks (recompute).
    pub seed: u64,
    /// Fused attention (`layers::flash`, PyTorch's sdpa kernels' memory) instead of the
    /// composed softmax(QK^T)V that stores the probabilities.
    pub flash_attention: bool,
    /// Selective checkpointing (Korthikanti et al. 2022): eager attention keeps only q, k, v and
    /// recomputes its probabilities (and their dropout mask) in backward.
    pub recompute_attention: bool,
    /// sdpa run as its math path on a CPU (attention dropout on) in half precision: PyTorch's
    /// math path casts q, k and v to fp32 and keeps fp32 probabilities, mask and dropped
    /// probabilities (measured with saved-tensor hooks, PyTorch 2.15), so the eager attention
    /// that stands for it runs in fp32.
    pub upcast_math_attention: bool,
    /// Forward only (a checkpointed block's first forward, as under `torch.no_grad`): weights
    /// enter detached, so no op keeps anything for backward and each intermediate is freed as
    /// soon as the next is made.
    pub no_grad: bool,
}

/// Everything that regenerates one dropout site's keep mask: the same site gives the same mask,
/// so selective recomputation rebuilds the attention probabilities' mask in backward instead of
/// keeping it.
#[derive(Debug, Clone)]
pub struct MaskSite {
    /// the step's dropout seed
    pub seed: u64,
    /// dropout probability (0: no mask)
    pub p: f32,
    pub site: u64,
    pub shape: candle_core::Shape,
    pub dtype: DType,
    pub device: Device,
}

impl MaskSite {
    /// The keep mask (None without dropout), as [`Ctx::dropout_mask`] describes it.
    pub fn mask(&self) -> candle_core::Result<Option<Tensor>> {
        if self.p <= 0.0 {
            return Ok(None);
        }
        let (shape, dev) = (&self.shape, &self.device);
        let site_seed = self.seed.wrapping_mul(0x100_0000_01b3) ^ self.site;
        if !dev.is_cpu() && dev.set_seed(site_seed).is_ok() {
            // Accelerators: the device RNG, reseeded per site, so masks are reproducible
            // without a host round trip (`ge` yields u8).
            let keep = Tensor::rand(0f32, 1f32, shape, dev)?.ge(self.p as f64)?;
            return Ok(Some(keep));
        }
        let n = shape.elem_count();
        let threshold = (self.p as f64 * u32::MAX as f64) as u32;
        let kept = (1.0 / (1.0 - self.p as f64)) as f32;
        let mut rng = FastRng::new(site_seed);
        let mut mask = Vec::with_capacity(n);
        while mask.len() < n {
            let r = rng.next_u64();
            for half in [r as u32, (r >> 32) as u32] {
                if mask.len() < n {
                    mask.push(if half >= threshold { kept } else { 0.0 });
                }
            }
        }
        let mask = Tensor::from_vec(mask, shape, dev)?;
        if !dev.is_cpu() {
            // an accelerator without a seedable RNG: the host mask, as bytes
            return Ok(Some(mask.ne(0f32)?));
        }
        Ok(Some(mask.to_dtype(self.dtype)?))
    }
}

impl<'a> Ctx<'a> {
    /// The full weight in its storage dtype. Under ZeRO-3 the rows other ranks own are allocated
    /// for the duration of the use (zeros) and concatenated after the resident shard, so the
    /// gradient flows only into the shard Var.
    pub fn w_raw(&self, idx: usize) -> candle_core::Result<Tensor> {
        let w = self.w_tracked(idx)?;
        Ok(if self.no_grad { w.detach() } else { w })
    }

    fn w_tracked(&self, idx: usize) -> candle_core::Result<Tensor> {
        let p = &self.store.params[idx];
        if let Some(q) = &p.nf4 {
            // dequantized for this use only (bitsandbytes' dequantize_4bit in forward/backward)
            return q.dequantize(p.var.dtype());
        }
        let frozen;
        let t = if p.trainable {
            p.var.as_tensor()
        } else {
            // a frozen weight enters the graph as a plain tensor: no gradient reaches it
            frozen = p.var.as_tensor().detach();
            &frozen
        };
        if !p.is_partial() {
            return Ok(t.clone());
        }
        let mut rest = p.shape.clone();
        rest[0] -= t.dims()[0];
        let fill = Tensor::zeros(rest, t.dtype(), t.device())?;
        Tensor::cat(&[t, &fill], 0)
    }

    /// The weight cast to the compute dtype (autocast: a differentiable `to_dtype`, so fp32
    /// Vars receive fp32 gradients).
    pub fn w(&self, idx: usize) -> candle_core::Result<Tensor> {
        let t = self.w_raw(idx)?;
        if t.dtype() == self.dtype {
            Ok(t)
        } else {
            t.to_dtype(self.dtype)
        }
    }

    /// `x` in the compute dtype: itself, or autocast's cast of it (a graph node).
    pub fn compute(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if x.dtype() == self.dtype {
            Ok(x.clone())
        } else {
            x.to_dtype(self.dtype)
        }
    }

    /// The input of a second or third linear reading the same pre-norm output under autocast:
    /// a 16-bit copy of its own. autocast casts an activation anew at every call (its cache
    /// holds only weights), so transformers' separate q, k and v projections keep three copies of
    /// the fp32 norm output, and SwiGLU's gate and up two (measured with saved-tensor hooks,
    /// PyTorch 2.15 CPU autocast: Llama and ViT blocks). The norm node writes the first copy
    /// ([`super::ops::Norm::forward_to`]); a post-norm block's fp32 stream is cast by each
    /// linear anyway ([`Ctx::compute`]), and outside autocast every reader shares `x`. A reader
    /// that keeps no input (`keeps_input` false: a frozen, unadapted linear, as PyTorch saves a
    /// linear's input only for a gradient that needs it) shares `x` too: its cast is transient
    /// in PyTorch.
    pub fn autocast_copy(&self, x: &Tensor, keeps_input: bool) -> candle_core::Result<Tensor> {
        if keeps_input && self.store.dtype != self.dtype && x.dtype() == self.dtype {
            x.copy()
        } else {
            Ok(x.clone())
        }
    }

    /// Inverted dropout with the keep mask of [`Ctx::dropout_mask`] ([`fused::dropout`]: keeps
    /// its input and the mask; [`super::joins`] has the joins that keep only the mask).
    pub fn dropout(&self, x: &Tensor, site: u64) -> candle_core::Result<Tensor> {
        match self.dropout_mask(x.shape(), x.dtype(), x.device(), site)? {
            Some(keep) => fused::dropout(x, &keep, self.dropout),
            None => Ok(x.clone()),
        }
    }

    /// The keep mask for dropout of a tensor of `shape` and `dtype` at `site` (None without
    /// dropout), derived
    /// from (step seed, site), so the same seed gives the same mask (recompute). Stored as
    /// PyTorch stores it: on the CPU a tensor of `x`'s dtype holding 0 or `1 / (1 - p)` (the
    /// scaled noise `at::dropout` keeps), on accelerators a 1-byte mask (`u8`, as the fused CUDA
    /// kernel's bool mask).
    pub fn dropout_mask(
        &self,
        shape: &candle_core::Shape,
        dtype: DType,
        dev: &Device,
        site: u64,
    ) -> candle_core::Result<Option<Tensor>> {
        self.mask_site(shape, dtype, dev, site).mask()
    }

    /// What regenerates the mask of [`Ctx::dropout_mask`] with these arguments.
    pub fn mask_site(
        &self,
        shape: &candle_core::Shape,
        dtype: DType,
        dev: &Device,
        site: u64,
    ) -> MaskSite {
        MaskSite {
            seed: self.seed,
            p: self.dropout,
            site,
            shape: shape.clone(),
            dtype,
            device: dev.clone(),
        }
    }
}
