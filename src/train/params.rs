//! The trainable LoRA: one (A, B) pair per targeted Linear of the transformer, kept in f32 on
//! the plain (non-autodiff) device, and installed on the model as side-path
//! [`Adapter`]s for each forward. The base weights never leave the plain device, so autodiff
//! sees them as constants: no full-size weight gradient is ever computed or stored.

use std::collections::BTreeMap;

use anyhow::{Result, bail};
use burn::module::{Param, ParamId};
use burn::tensor::{DType, Device, Gradients, Tensor, TensorData};

use crate::engine::flux::Flux;
use crate::engine::layers::Adapter;
use crate::engine::noise::Mt19937;

/// Which Linears get a LoRA (`--targets`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Targets {
    /// Every Linear of the double and single blocks (fused qkv, proj, MLPs, modulation,
    /// linear1/linear2), as kohya's FLUX trainer does.
    All,
    /// The attention Linears: qkv and proj of both streams in the double blocks, linear1
    /// (which holds q/k/v) and linear2 in the single blocks.
    Attn,
    /// Only the single blocks (FluxGym's low-memory preset).
    Single,
}

impl Targets {
    /// Whether the Linear at BFL path `path` is trained.
    pub fn covers(self, path: &str) -> bool {
        let double = path.starts_with("double_blocks.");
        let single = path.starts_with("single_blocks.");
        match self {
            Targets::All => double || single,
            Targets::Single => single,
            Targets::Attn => {
                (double && (path.ends_with("_attn.qkv") || path.ends_with("_attn.proj")))
                    || (single && (path.ends_with(".linear1") || path.ends_with(".linear2")))
            }
        }
    }
}

/// One LoRA pair in the adapter layout of [`Adapter`]: `down` = Aᵀ [in, r], `up` = Bᵀ [r, out]
/// (PyTorch's A is [r, in], B is [out, r]). ΔW = (alpha / r) · B·A.
#[derive(Debug, Clone)]
pub struct LoraPair {
    /// BFL path of the target Linear (`double_blocks.0.img_attn.qkv`).
    pub path: String,
    pub down: Tensor<2>,
    pub up: Tensor<2>,
}

/// The gradient of the loss with respect to one pair, same layout.
#[derive(Debug, Clone)]
pub struct PairGrad {
    pub down: Tensor<2>,
    pub up: Tensor<2>,
}

/// The LoRA being trained.
#[derive(Debug, Clone)]
pub struct TrainableLora {
    pub rank: usize,
    pub alpha: f32,
    /// Sorted by path (the order of the optimizer state and of checkpoints).
    pub pairs: Vec<LoraPair>,
}

/// Autodiff leaves standing for some pairs during one forward: (index into `pairs`, down, up).
pub struct Leaves(Vec<(usize, Tensor<2>, Tensor<2>)>);

impl Leaves {
    /// The gradients of these leaves, added into `into` (index-aligned with `pairs`).
    pub fn collect(&self, grads: &Gradients, into: &mut [Option<PairGrad>]) {
        for (i, down, up) in &self.0 {
            let (Some(gd), Some(gu)) = (down.grad(grads), up.grad(grads)) else {
                continue; // a pair that did not take part in this graph
            };
            // The leaves are the f32 master copies, but with a f16/bf16 base the gradient
            // arrives through a cast: keep the optimizer's arithmetic in f32.
            let (gd, gu) = (gd.cast(DType::F32), gu.cast(DType::F32));
            into[*i] = Some(match into[*i].take() {
                Some(acc) => PairGrad { down: acc.down + gd, up: acc.up + gu },
                None => PairGrad { down: gd, up: gu },
            });
        }
    }
}

impl TrainableLora {
    /// A fresh LoRA on the Linears `targets` selects: A from kaiming-uniform with a = √5 (peft's
    /// and kohya's init, U(±1/√in)), drawn from `seed`; B zero, so training starts at the base.
    pub fn new(
        model: &mut Flux,
        targets: Targets,
        rank: usize,
        alpha: f32,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        let mut rng = Mt19937::new(seed);
        let mut pairs = Vec::new();
        let mut linears: Vec<(String, usize, usize)> =
            model.linears_mut().into_iter().map(|(p, l)| (p, l.dims().0, l.dims().1)).collect();
        linears.sort();
        for (path, inputs, outputs) in linears {
            if !targets.covers(&path) {
                continue;
            }
            if rank == 0 || rank > inputs.min(outputs) {
                bail!(
                    "rank {rank} does not fit {path} ([{outputs}, {inputs}]): the rank must be 1..={}",
                    inputs.min(outputs)
                );
            }
            let bound = 1.0 / (inputs as f64).sqrt();
            // A [r, in] row-major, drawn in PyTorch's order, stored transposed.
            let a: Vec<f32> = (0..rank * inputs)
                .map(|_| ((rng.next_u32() as f64 / u32::MAX as f64 * 2.0 - 1.0) * bound) as f32)
                .collect();
            pairs.push(LoraPair {
                down: torch_to_adapter(&a, rank, inputs, device),
                up: Tensor::zeros([rank, outputs], device),
                path,
            });
        }
        if pairs.is_empty() {
            bail!("--targets {targets:?} selects no Linear of this model");
        }
        Ok(TrainableLora { rank, alpha, pairs })
    }

    /// A LoRA from PyTorch-layout factors, `(path, A [r, in], B [out, r])` (tests, resume).
    pub fn from_factors(rank: usize, alpha: f32, factors: Vec<(String, Vec<f32>, Vec<f32>)>, device: &Device) -> Self {
        let mut pairs: Vec<LoraPair> = factors
            .into_iter()
            .map(|(path, a, b)| {
                let inputs = a.len() / rank;
                let outputs = b.len() / rank;
                let down = torch_to_adapter(&a, rank, inputs, device);
                // Bᵀ [r, out] from B [out, r].
                let up = Tensor::<2>::from_data(TensorData::new(b, [outputs, rank]), device).transpose();
                LoraPair { path, down, up }
            })
            .collect();
        pairs.sort_by(|x, y| x.path.cmp(&y.path));
        TrainableLora { rank, alpha, pairs }
    }

    /// alpha / rank, the factor of B·A.
    pub fn scale(&self) -> f32 {
        self.alpha / self.rank as f32
    }

    /// Number of trained values.
    pub fn numel(&self) -> usize {
        self.pairs.iter().map(|p| p.down.shape().num_elements() + p.up.shape().num_elements()).sum()
    }

    /// Sets the adapters of the Linears whose path starts with `prefix` ("" for all pairs):
    /// as autodiff leaves when `tracked` (returned, to read their gradients after backward),
    /// else as plain tensors (a forward that records nothing). Other Linears keep theirs.
    pub fn install(&self, model: &mut Flux, prefix: &str, tracked: bool) -> Leaves {
        let mut linears: BTreeMap<String, _> = model.linears_mut().into_iter().collect();
        let scale = self.scale();
        let mut leaves = Vec::new();
        for (i, pair) in self.pairs.iter().enumerate() {
            if !pair.path.starts_with(prefix) {
                continue;
            }
            let Some(linear) = linears.get_mut(&pair.path) else {
                continue; // `new` and `from_factors` only name this model's Linears
            };
            let dtype = linear.weight.dtype();
            let (down, up) = if tracked {
                let down = pair.down.clone().autodiff().require_grad();
                let up = pair.up.clone().autodiff().require_grad();
                leaves.push((i, down.clone(), up.clone()));
                (down, up)
            } else {
                (pair.down.clone(), pair.up.clone())
            };
            // The master copy stays f32; a f16/bf16 base sees a cast of it. The scale is
            // folded into `up` inside the graph, so the gradient of B includes it, as in peft.
            let down = if dtype == DType::F32 { down } else { down.cast(dtype) };
            let up = up * scale;
            let up = if dtype == DType::F32 { up } else { up.cast(dtype) };
            // `Param::from_tensor` would mark the (non-leaf) tensors require_grad, which burn
            // refuses; these are not module parameters to burn, just values for the forward.
            linear.adapters = vec![Adapter {
                down: Param::initialized(ParamId::new(), down),
                up: Some(Param::initialized(ParamId::new(), up)),
                bias: None,
            }];
        }
        Leaves(leaves)
    }

    /// The optimizer's slots: each pair's down, then its up, flattened.
    pub fn slots(&self) -> Vec<Tensor<1>> {
        self.pairs.iter().flat_map(|p| [super::adamw::flat(p.down.clone()), super::adamw::flat(p.up.clone())]).collect()
    }

    /// Puts the values of [`TrainableLora::slots`] back into the pairs.
    pub fn set_slots(&mut self, slots: Vec<Tensor<1>>) {
        let mut slots = slots.into_iter();
        for pair in &mut self.pairs {
            let (down, up) = (slots.next().expect("a down slot"), slots.next().expect("an up slot"));
            pair.down = down.reshape(pair.down.dims());
            pair.up = up.reshape(pair.up.dims());
        }
    }

    /// PyTorch-layout factors `(path, A [r, in], B [out, r])` on the host.
    pub fn factors(&self) -> Vec<(String, Vec<f32>, Vec<f32>)> {
        self.pairs
            .iter()
            .map(|p| {
                let a = host(p.down.clone().transpose());
                let b = host(p.up.clone().transpose());
                (p.path.clone(), a, b)
            })
            .collect()
    }
}

/// A [r, n] row-major matrix (PyTorch layout) → its transpose [n, r] on `device`.
fn torch_to_adapter(a: &[f32], rank: usize, n: usize, device: &Device) -> Tensor<2> {
    Tensor::<2>::from_data(TensorData::new(a.to_vec(), [rank, n]), device).transpose()
}

/// A tensor's values, contiguous row-major, as f32 on the host.
pub fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.cast(DType::F32).into_data().try_to_vec::<f32>().expect("f32 tensor data")
}
