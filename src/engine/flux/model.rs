//! The FLUX.1 MMDiT: double-stream blocks (separate image and text weights, joint
//! attention) followed by single-stream blocks over the concatenated sequence.
//! Field names are the checkpoint's own key segments, so loading is a walk over names.

use std::borrow::Cow;

use anyhow::{Result, bail};
use burn::module::{Module, Param};
use burn::tensor::activation::silu;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{DType, Device, Tensor};

use crate::engine::layers::{self, Linear, gelu_tanh};
use crate::engine::loader::{self, Init, Loader, NamedParam};
use crate::engine::packed::Packing;
use crate::engine::{cpu, profile};

use super::config::FluxConfig;
use super::layout::TransformerWeights;
use super::rope::{Rope, timestep_embedding};

const EPS: f64 = 1e-6;

/// BFL's `MLPEmbedder`: Linear → SiLU → Linear.
#[derive(Module, Debug)]
pub struct MlpEmbedder {
    pub in_layer: Linear,
    pub out_layer: Linear,
}

impl MlpEmbedder {
    fn load(l: &Loader, inputs: usize, hidden: usize) -> Result<Self> {
        Ok(MlpEmbedder {
            in_layer: l.linear("in_layer", inputs, hidden, true)?,
            out_layer: l.linear("out_layer", hidden, hidden, true)?,
        })
    }

    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.out_layer.forward(silu(self.in_layer.forward(x)))
    }
}

/// RMSNorm over the head dim for queries and keys, computed in f32.
#[derive(Module, Debug)]
pub struct QkNorm {
    pub query_norm: Param<Tensor<1>>,
    pub key_norm: Param<Tensor<1>>,
}

impl QkNorm {
    fn load(l: &Loader, head_dim: usize) -> Result<Self> {
        Ok(QkNorm {
            query_norm: l.pp("query_norm").param("scale", [head_dim], Init::Ones)?,
            key_norm: l.pp("key_norm").param("scale", [head_dim], Init::Ones)?,
        })
    }

    /// Returns f32 queries and keys, ready for RoPE.
    pub fn forward(&self, q: Tensor<4>, k: Tensor<4>) -> (Tensor<4>, Tensor<4>) {
        (rms_norm(q, &self.query_norm.val()), rms_norm(k, &self.key_norm.val()))
    }
}

pub(crate) fn rms_norm(x: Tensor<4>, scale: &Tensor<1>) -> Tensor<4> {
    let x = x.cast(DType::F32);
    let rrms = (x.clone().square().mean_dim(3) + EPS).sqrt().recip();
    let scale = scale.clone().cast(DType::F32).reshape([1, 1, 1, -1]);
    x * rrms * scale
}

/// One (shift, scale, gate) triple, each [B, 1, hidden].
pub struct ModulationOut {
    pub shift: Tensor<3>,
    pub scale: Tensor<3>,
    pub gate: Tensor<3>,
}

impl ModulationOut {
    /// (1 + scale) · LayerNorm(x) + shift: AdaLN's modulated norm.
    fn modulate_norm(&self, x: Tensor<3>) -> Tensor<3> {
        modulated_norm(x, &self.shift, &self.scale)
    }
}

/// (1 + scale) · LayerNorm(x) + shift (eps 1e-6, no affine): one fused pass on the CPU, under
/// autodiff too; else burn's LayerNorm in f32 and the modulation.
fn modulated_norm(x: Tensor<3>, shift: &Tensor<3>, scale: &Tensor<3>) -> Tensor<3> {
    profile::span("norm+modulate", || {
        cpu::modulated_layer_norm(&x, shift, scale, EPS as f32)
            .or_else(|| cpu::tracked::modulated_layer_norm(&x, shift, scale, EPS as f32))
            .unwrap_or_else(|| (scale.clone() + 1.0) * layers::layer_norm(x, EPS, None) + shift.clone())
    })
}

/// Projects the conditioning vector to `chunks` modulation vectors.
#[derive(Module, Debug)]
pub struct Modulation {
    pub lin: Linear,
    pub chunks: usize,
}

impl Modulation {
    fn load(l: &Loader, hidden: usize, chunks: usize) -> Result<Self> {
        Ok(Modulation { lin: l.linear("lin", hidden, chunks * hidden, true)?, chunks })
    }

    pub fn forward(&self, vec: Tensor<2>) -> Vec<Tensor<3>> {
        self.lin.forward(silu(vec)).unsqueeze_dim::<3>(1).chunk(self.chunks, 2)
    }

    fn triples(&self, vec: Tensor<2>) -> Vec<ModulationOut> {
        let parts = self.forward(vec);
        parts
            .chunks(3)
            .map(|c| ModulationOut { shift: c[0].clone(), scale: c[1].clone(), gate: c[2].clone() })
            .collect()
    }
}

/// Splits fused [B, L, ≥ 3·H·D] projections (q, k, v first) into q, k, v of [B, H, L, D].
fn split_qkv(qkv: Tensor<3>, heads: usize, hd: usize) -> [Tensor<4>; 3] {
    let [b, l, _] = qkv.dims();
    let head = |i: usize| qkv.clone().narrow(2, i * hd, hd).reshape([b, l, heads, hd / heads]).swap_dims(1, 2);
    [head(0), head(1), head(2)]
}

/// q, k and v [B, H, ΣL, D] of the joint sequence of `streams` (projection, its q/k norm),
/// in order: q and k normalized and rotated (in f32), then all three in the model dtype.
fn joint_heads(streams: &[(Tensor<3>, &QkNorm)], heads: usize, hd: usize, rope: &Rope) -> [Tensor<4>; 3] {
    profile::span("heads (norm, rope, join)", || {
        let fused =
            with_head_streams(streams, |fused| cpu::joint_heads(fused, heads, EPS as f32, &rope.cos, &rope.sin));
        if let Some(heads) = fused {
            return heads;
        }
        let dtype = streams[0].0.dtype();
        let (mut q, mut k, mut v) = (Vec::new(), Vec::new(), Vec::new());
        for (qkv, norm) in streams {
            let [sq, sk, sv] = split_qkv(qkv.clone(), heads, hd);
            let (sq, sk) = norm.forward(sq, sk);
            q.push(sq);
            k.push(sk);
            v.push(sv);
        }
        let (q, k, v) = (Tensor::cat(q, 2), Tensor::cat(k, 2), Tensor::cat(v, 2));
        [rope.apply(q).cast(dtype), rope.apply(k).cast(dtype), v]
    })
}

/// `f` of the streams as the CPU kernels take them (projections and q/k norm scales).
fn with_head_streams<T>(streams: &[(Tensor<3>, &QkNorm)], f: impl FnOnce(&[cpu::HeadStream]) -> T) -> T {
    let (qs, ks): (Vec<_>, Vec<_>) = streams.iter().map(|(_, n)| (n.query_norm.val(), n.key_norm.val())).unzip();
    let fused: Vec<_> = streams
        .iter()
        .zip(qs.iter().zip(&ks))
        .map(|((qkv, _), (q_scale, k_scale))| cpu::HeadStream { qkv, q_scale, k_scale })
        .collect();
    f(&fused)
}

/// Attention over the joint sequence of `streams` (projection, its q/k norm): the heads
/// ([`joint_heads`]) then [`attention_merged`]; [B, ΣL, H·D]. Under autodiff on the CPU
/// (LoRA training) both are one op with a hand-written backward (`cpu::tracked`).
fn joint_attention(streams: &[(Tensor<3>, &QkNorm)], heads: usize, hd: usize, rope: &Rope, bf16: bool) -> Tensor<3> {
    let tracked = streams.iter().any(|(x, _)| x.is_autodiff());
    let fused = tracked.then(|| {
        profile::span("heads+attention (autodiff)", || {
            with_head_streams(streams, |s| cpu::tracked::joint_attention(s, heads, EPS as f32, (&rope.cos, &rope.sin)))
        })
    });
    fused.flatten().unwrap_or_else(|| {
        let [q, k, v] = joint_heads(streams, heads, hd, rope);
        attention_merged(q, k, v, bf16)
    })
}

/// Scaled dot-product attention; returns [B, L, H·D]. `bf16`: on AMX tiles where the CPU has
/// them (the block's Linears are bf16 tiles: `--dtype bf16` on such a CPU).
fn attention_merged(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, bf16: bool) -> Tensor<3> {
    profile::span("attention", || {
        if let Some(x) = cpu::attention(&q, &k, &v, bf16).or_else(|| cpu::tracked::attention(&q, &k, &v)) {
            return x;
        }
        let x = attention(q, k, v, None, None, AttentionModuleOptions::default());
        let [b, h, l, d] = x.dims();
        x.swap_dims(1, 2).reshape([b, l, h * d])
    })
}

/// x + gate · y, the residual update of every block.
fn gated_add(x: Tensor<3>, gate: Tensor<3>, y: Tensor<3>) -> Tensor<3> {
    profile::span("gated residual", || {
        cpu::gated_add(&x, &gate, &y).or_else(|| cpu::tracked::gated_add(&x, &gate, &y)).unwrap_or_else(|| x + gate * y)
    })
}

fn gelu(x: Tensor<3>) -> Tensor<3> {
    profile::span("gelu", || gelu_tanh(x))
}

/// f16's largest finite value.
const F16_MAX: f64 = 65504.0;

/// In f16, FLUX's activations can leave the format's range in the text stream of double
/// blocks and in single blocks; ComfyUI and diffusers then apply `nan_to_num(nan=0,
/// posinf=65504, neginf=-65504)`. The same here (clamp, NaN → 0); other dtypes pass through.
fn f16_guard(x: Tensor<3>) -> Tensor<3> {
    if x.dtype() != DType::F16 {
        return x;
    }
    let x = x.clamp(-F16_MAX, F16_MAX);
    x.clone().mask_fill(x.is_nan(), 0.0)
}

/// Attention weights of one stream in a double block.
#[derive(Module, Debug)]
pub struct SelfAttention {
    pub qkv: Linear,
    pub norm: QkNorm,
    pub proj: Linear,
}

impl SelfAttention {
    fn load(l: &Loader, c: &FluxConfig) -> Result<Self> {
        let h = c.hidden_size;
        Ok(SelfAttention {
            qkv: l.linear("qkv", h, 3 * h, c.qkv_bias)?,
            norm: QkNorm::load(&l.pp("norm"), c.head_dim())?,
            proj: l.linear("proj", h, h, true)?,
        })
    }
}

/// Linear → GELU(tanh) → Linear, BFL's `img_mlp` / `txt_mlp` (`0` and `2` in its Sequential).
#[derive(Module, Debug)]
pub struct Mlp {
    pub fc1: Linear,
    pub fc2: Linear,
}

impl Mlp {
    fn load(l: &Loader, hidden: usize, mlp: usize) -> Result<Self> {
        Ok(Mlp { fc1: l.linear("0", hidden, mlp, true)?, fc2: l.linear("2", mlp, hidden, true)? })
    }

    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        self.fc2.forward(gelu(self.fc1.forward(x)))
    }
}

#[derive(Module, Debug)]
pub struct DoubleStreamBlock {
    pub img_mod: Modulation,
    pub img_attn: SelfAttention,
    pub img_mlp: Mlp,
    pub txt_mod: Modulation,
    pub txt_attn: SelfAttention,
    pub txt_mlp: Mlp,
    pub num_heads: usize,
}

impl DoubleStreamBlock {
    pub fn load(l: &Loader, c: &FluxConfig) -> Result<Self> {
        let (h, mlp) = (c.hidden_size, c.mlp_hidden_dim);
        Ok(DoubleStreamBlock {
            img_mod: Modulation::load(&l.pp("img_mod"), h, 6)?,
            img_attn: SelfAttention::load(&l.pp("img_attn"), c)?,
            img_mlp: Mlp::load(&l.pp("img_mlp"), h, mlp)?,
            txt_mod: Modulation::load(&l.pp("txt_mod"), h, 6)?,
            txt_attn: SelfAttention::load(&l.pp("txt_attn"), c)?,
            txt_mlp: Mlp::load(&l.pp("txt_mlp"), h, mlp)?,
            num_heads: c.num_heads,
        })
    }

    /// Every Linear with its checkpoint path, for block `index` (see [`Flux::linears_mut`]).
    pub fn linears_mut(&mut self, index: usize) -> Vec<(String, &mut Linear)> {
        let p = format!("double_blocks.{index}");
        vec![
            (format!("{p}.img_mod.lin"), &mut self.img_mod.lin),
            (format!("{p}.img_attn.qkv"), &mut self.img_attn.qkv),
            (format!("{p}.img_attn.proj"), &mut self.img_attn.proj),
            (format!("{p}.img_mlp.0"), &mut self.img_mlp.fc1),
            (format!("{p}.img_mlp.2"), &mut self.img_mlp.fc2),
            (format!("{p}.txt_mod.lin"), &mut self.txt_mod.lin),
            (format!("{p}.txt_attn.qkv"), &mut self.txt_attn.qkv),
            (format!("{p}.txt_attn.proj"), &mut self.txt_attn.proj),
            (format!("{p}.txt_mlp.0"), &mut self.txt_mlp.fc1),
            (format!("{p}.txt_mlp.2"), &mut self.txt_mlp.fc2),
        ]
    }

    pub fn forward(&self, img: Tensor<3>, txt: Tensor<3>, vec: Tensor<2>, rope: &Rope) -> (Tensor<3>, Tensor<3>) {
        let [img_mod1, img_mod2]: [ModulationOut; 2] =
            self.img_mod.triples(vec.clone()).try_into().ok().expect("6 chunks");
        let [txt_mod1, txt_mod2]: [ModulationOut; 2] = self.txt_mod.triples(vec).try_into().ok().expect("6 chunks");

        let img_qkv = self.img_attn.qkv.forward(img_mod1.modulate_norm(img.clone()));
        let txt_qkv = self.txt_attn.qkv.forward(txt_mod1.modulate_norm(txt.clone()));

        // Joint attention over text then image tokens.
        let hd = self.img_attn.proj.dims().0;
        let streams = [(txt_qkv, &self.txt_attn.norm), (img_qkv, &self.img_attn.norm)];
        let bf16 = self.img_attn.qkv.weight.packing() == Some(Packing::Bf16Tiles);
        let attn = joint_attention(&streams, self.num_heads, hd, rope, bf16);
        let txt_len = txt.dims()[1];
        let txt_attn = attn.clone().narrow(1, 0, txt_len);
        let img_attn = attn.narrow(1, txt_len, img.dims()[1]);

        let img = gated_add(img, img_mod1.gate, self.img_attn.proj.forward(img_attn));
        let img = gated_add(img.clone(), img_mod2.gate.clone(), self.img_mlp.forward(img_mod2.modulate_norm(img)));
        let txt = gated_add(txt, txt_mod1.gate, self.txt_attn.proj.forward(txt_attn));
        let txt = gated_add(txt.clone(), txt_mod2.gate.clone(), self.txt_mlp.forward(txt_mod2.modulate_norm(txt)));
        (img, f16_guard(txt))
    }
}

/// Parallel attention + MLP over the joint sequence, with fused input and output projections.
#[derive(Module, Debug)]
pub struct SingleStreamBlock {
    /// → q, k, v and the MLP's hidden input, in that order.
    pub linear1: Linear,
    /// ← attention output and activated MLP hidden, concatenated.
    pub linear2: Linear,
    pub norm: QkNorm,
    pub modulation: Modulation,
    pub num_heads: usize,
    pub hidden_size: usize,
}

impl SingleStreamBlock {
    pub fn load(l: &Loader, c: &FluxConfig) -> Result<Self> {
        let (h, mlp) = (c.hidden_size, c.mlp_hidden_dim);
        Ok(SingleStreamBlock {
            linear1: l.linear("linear1", h, 3 * h + mlp, true)?,
            linear2: l.linear("linear2", h + mlp, h, true)?,
            norm: QkNorm::load(&l.pp("norm"), c.head_dim())?,
            modulation: Modulation::load(&l.pp("modulation"), h, 3)?,
            num_heads: c.num_heads,
            hidden_size: c.hidden_size,
        })
    }

    /// Every Linear with its checkpoint path, for block `index` (see [`Flux::linears_mut`]).
    pub fn linears_mut(&mut self, index: usize) -> Vec<(String, &mut Linear)> {
        let p = format!("single_blocks.{index}");
        vec![
            (format!("{p}.linear1"), &mut self.linear1),
            (format!("{p}.linear2"), &mut self.linear2),
            (format!("{p}.modulation.lin"), &mut self.modulation.lin),
        ]
    }

    pub fn forward(&self, x: Tensor<3>, vec: Tensor<2>, rope: &Rope) -> Tensor<3> {
        let m = self.modulation.triples(vec).pop().expect("3 chunks");
        let h = self.linear1.forward(m.modulate_norm(x.clone()));
        let mlp_dim = h.dims()[2] - 3 * self.hidden_size;
        let mlp = h.clone().narrow(2, 3 * self.hidden_size, mlp_dim);
        let bf16 = self.linear1.weight.packing() == Some(Packing::Bf16Tiles);
        let attn = joint_attention(&[(h, &self.norm)], self.num_heads, self.hidden_size, rope, bf16);
        let mlp = gelu(mlp);
        let hidden = profile::span("concat", || Tensor::cat(vec![attn, mlp], 2));
        let out = self.linear2.forward(hidden);
        f16_guard(gated_add(x, m.gate, out))
    }
}

/// AdaLN (shift, scale) then the projection back to packed latent channels.
#[derive(Module, Debug)]
pub struct LastLayer {
    /// BFL's `adaLN_modulation.1` (index 0 of its Sequential is the SiLU).
    pub ada_ln_modulation: Linear,
    pub linear: Linear,
}

impl LastLayer {
    fn load(l: &Loader, c: &FluxConfig) -> Result<Self> {
        let h = c.hidden_size;
        Ok(LastLayer {
            ada_ln_modulation: l.pp("adaLN_modulation").linear("1", h, 2 * h, true)?,
            linear: l.linear("linear", h, c.out_channels, true)?,
        })
    }

    pub fn forward(&self, x: Tensor<3>, vec: Tensor<2>) -> Tensor<3> {
        let mut parts = self.ada_ln_modulation.forward(silu(vec)).unsqueeze_dim::<3>(1).chunk(2, 2);
        let scale = parts.pop().unwrap();
        let shift = parts.pop().unwrap();
        self.linear.forward(modulated_norm(x, &shift, &scale))
    }
}

/// The whole transformer.
#[derive(Module, Debug)]
pub struct Flux {
    pub img_in: Linear,
    pub txt_in: Linear,
    pub time_in: MlpEmbedder,
    pub vector_in: MlpEmbedder,
    pub guidance_in: Option<MlpEmbedder>,
    pub double_blocks: Vec<DoubleStreamBlock>,
    pub single_blocks: Vec<SingleStreamBlock>,
    pub final_layer: LastLayer,
    #[module(skip)]
    pub config: FluxConfig,
}

/// The streams entering the first block: image and text tokens [B, L, hidden] and the
/// conditioning vector [B, hidden].
pub struct Embedded {
    pub img: Tensor<3>,
    pub txt: Tensor<3>,
    pub vec: Tensor<2>,
}

/// Where a forward pass takes its blocks from: the model's own (resident), or built one at a
/// time just before each runs and dropped after it (streamed, see `engine::streaming`).
pub trait BlockSource {
    fn double(&self, index: usize) -> Result<Cow<'_, DoubleStreamBlock>>;
    fn single(&self, index: usize) -> Result<Cow<'_, SingleStreamBlock>>;
}

impl BlockSource for Flux {
    fn double(&self, index: usize) -> Result<Cow<'_, DoubleStreamBlock>> {
        self.double_blocks.get(index).map(Cow::Borrowed).ok_or_else(|| anyhow::anyhow!("no double block {index}"))
    }

    fn single(&self, index: usize) -> Result<Cow<'_, SingleStreamBlock>> {
        self.single_blocks.get(index).map(Cow::Borrowed).ok_or_else(|| anyhow::anyhow!("no single block {index}"))
    }
}

/// Conditioning for one forward pass; `timesteps` and `guidance` have one value per batch
/// item, timesteps in [0, 1] (sigma), as diffusers passes them.
pub struct FluxInput<'a> {
    /// Packed latents [B, L_img, in_channels].
    pub img: Tensor<3>,
    /// T5 states [B, L_txt, context_in_dim].
    pub txt: Tensor<3>,
    /// CLIP pooled [B, vec_in_dim].
    pub y: Tensor<2>,
    pub timesteps: &'a [f32],
    pub guidance: Option<&'a [f32]>,
    /// Built from text ids then image ids.
    pub rope: &'a Rope,
}

impl Flux {
    /// The module tree of `config`, walked once: from a checkpoint, as a check, or random.
    pub fn build(l: &Loader, config: FluxConfig) -> Result<Self> {
        Self::walk(l, config, true)
    }

    /// The non-block layers only (embedders and final layer), for a model whose blocks are
    /// streamed: `double_blocks` and `single_blocks` stay empty, `config` keeps the depths.
    pub fn build_stem(l: &Loader, config: FluxConfig) -> Result<Self> {
        Self::walk(l, config, false)
    }

    /// The one walk of [`Flux::build`] and [`Flux::build_stem`], in checkpoint order (a random
    /// model draws its values in this order), the blocks included or left empty.
    fn walk(l: &Loader, config: FluxConfig, blocks: bool) -> Result<Self> {
        let c = &config;
        let h = c.hidden_size;
        let (depth, depth_single) = if blocks { (c.depth, c.depth_single_blocks) } else { (0, 0) };
        Ok(Flux {
            img_in: l.linear("img_in", c.in_channels, h, true)?,
            txt_in: l.linear("txt_in", c.context_in_dim, h, true)?,
            time_in: MlpEmbedder::load(&l.pp("time_in"), 256, h)?,
            vector_in: MlpEmbedder::load(&l.pp("vector_in"), c.vec_in_dim, h)?,
            guidance_in: c.guidance_embed.then(|| MlpEmbedder::load(&l.pp("guidance_in"), 256, h)).transpose()?,
            double_blocks: (0..depth)
                .map(|i| DoubleStreamBlock::load(&l.pp("double_blocks").pp(i), c))
                .collect::<Result<_>>()?,
            single_blocks: (0..depth_single)
                .map(|i| SingleStreamBlock::load(&l.pp("single_blocks").pp(i), c))
                .collect::<Result<_>>()?,
            final_layer: LastLayer::load(&l.pp("final_layer"), c)?,
            config,
        })
    }

    /// Checks the checkpoint against `config`'s module tree, then loads it tensor by tensor, in
    /// `dtype` on `device`.
    pub fn load(weights: &TransformerWeights, config: FluxConfig, device: &Device, dtype: DType) -> Result<Self> {
        Ok(Self::load_named(weights, config, device, dtype)?.0)
    }

    /// [`Flux::load`], with its parameters by checkpoint name and the number of tensors read
    /// (full training).
    pub fn load_named(
        weights: &TransformerWeights,
        config: FluxConfig,
        device: &Device,
        dtype: DType,
    ) -> Result<(Self, Vec<NamedParam>, usize)> {
        let what = weights.describe();
        loader::load_named(weights, device, dtype, (&what, "the FLUX layout"), |l| Self::build(l, config.clone()))
    }

    /// Every Linear with its checkpoint path (`double_blocks.0.img_attn.qkv`): what LoRAs
    /// target (see `engine::lora`).
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out: Vec<(String, &mut Linear)> =
            vec![("img_in".into(), &mut self.img_in), ("txt_in".into(), &mut self.txt_in)];
        fn embedder<'a>(name: &str, e: &'a mut MlpEmbedder) -> [(String, &'a mut Linear); 2] {
            [(format!("{name}.in_layer"), &mut e.in_layer), (format!("{name}.out_layer"), &mut e.out_layer)]
        }
        out.extend(embedder("time_in", &mut self.time_in));
        out.extend(embedder("vector_in", &mut self.vector_in));
        if let Some(g) = &mut self.guidance_in {
            out.extend(embedder("guidance_in", g));
        }
        for (i, b) in self.double_blocks.iter_mut().enumerate() {
            out.extend(b.linears_mut(i));
        }
        for (i, b) in self.single_blocks.iter_mut().enumerate() {
            out.extend(b.linears_mut(i));
        }
        out.push(("final_layer.linear".into(), &mut self.final_layer.linear));
        out.push(("final_layer.adaLN_modulation.1".into(), &mut self.final_layer.ada_ln_modulation));
        out
    }

    /// RoPE tables for a text length and a packed latent grid.
    pub fn rope(&self, txt_len: usize, rows: usize, cols: usize, device: &Device) -> Rope {
        let mut ids = super::rope::text_ids(txt_len);
        ids.extend(super::rope::image_ids(rows, cols));
        Rope::new(&ids, &self.config.axes_dim, self.config.theta, device)
    }

    /// Checks the input sizes and runs everything before the blocks: the input projections and
    /// the conditioning vector (training runs the blocks itself, see `train::recompute`).
    pub fn embed(&self, input: FluxInput) -> Result<Embedded> {
        let FluxInput { img, txt, y, timesteps, guidance, rope } = input;
        let [batch, img_len, channels] = img.dims();
        let [txt_batch, txt_len, txt_dim] = txt.dims();
        let c = &self.config;
        if channels != c.in_channels || txt_dim != c.context_in_dim || y.dims() != [batch, c.vec_in_dim] {
            bail!(
                "input sizes img {:?}, txt {:?}, y {:?} do not fit this model ({} / {} / {})",
                img.dims(),
                txt.dims(),
                y.dims(),
                c.in_channels,
                c.context_in_dim,
                c.vec_in_dim
            );
        }
        if txt_batch != batch || timesteps.len() != batch {
            bail!("batch sizes differ: img {batch}, txt {txt_batch}, timesteps {}", timesteps.len());
        }
        if rope.cos.dims()[2] != txt_len + img_len {
            bail!("RoPE table covers {} tokens, input has {}", rope.cos.dims()[2], txt_len + img_len);
        }
        let device = img.device();
        let dtype = img.dtype();
        let embed = |v: &[f32]| timestep_embedding(v, 256, &device).cast(dtype);

        let img = self.img_in.forward(img);
        let mut vec = self.time_in.forward(embed(timesteps));
        match (&self.guidance_in, guidance) {
            (Some(g_in), Some(g)) if g.len() == batch => vec = vec + g_in.forward(embed(g)),
            (Some(_), Some(g)) => bail!("{} guidance values for a batch of {batch}", g.len()),
            (Some(_), None) => bail!("this model (FLUX.1-dev style) needs a guidance value"),
            (None, _) => {} // schnell ignores guidance, as the reference does
        }
        let vec = vec + self.vector_in.forward(y);
        let txt = self.txt_in.forward(txt);
        Ok(Embedded { img, txt, vec })
    }

    /// Predicts the flow velocity for packed latents: [B, L_img, out_channels].
    pub fn forward(&self, input: FluxInput) -> Result<Tensor<3>> {
        self.forward_with(input, self)
    }

    /// [`Flux::forward`] with the blocks taken from `blocks` (this model's own, or streamed),
    /// in order; each is dropped once it ran when the source built it.
    pub fn forward_with(&self, input: FluxInput, blocks: &dyn BlockSource) -> Result<Tensor<3>> {
        let rope = input.rope;
        let Embedded { mut img, mut txt, vec } = self.embed(input)?;
        let (txt_len, img_len) = (txt.dims()[1], img.dims()[1]);
        let c = &self.config;
        for i in 0..c.depth {
            (img, txt) = blocks.double(i)?.forward(img, txt, vec.clone(), rope);
        }
        let mut x = Tensor::cat(vec![txt, img], 1);
        for i in 0..c.depth_single_blocks {
            x = blocks.single(i)?.forward(x, vec.clone(), rope);
        }
        let img = x.narrow(1, txt_len, img_len);
        Ok(self.final_layer.forward(img, vec))
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{DType, Device, Tensor, TensorData};

    #[test]
    fn the_f16_guard_is_nan_to_num_in_f16_only() {
        let device = Device::flex();
        let x =
            Tensor::<3>::from_data(TensorData::new(vec![1e5f32, f32::NEG_INFINITY, f32::NAN, 3.0], [1, 1, 4]), &device);
        let guarded = super::f16_guard(x.clone().cast(DType::F16)).cast(DType::F32);
        assert_eq!(guarded.into_data().try_to_vec::<f32>().unwrap(), vec![65504.0, -65504.0, 0.0, 3.0]);
        let same = super::f16_guard(x).into_data().try_to_vec::<f32>().unwrap();
        assert!(same[0] == 1e5 && same[1] == f32::NEG_INFINITY && same[2].is_nan());
    }
}
