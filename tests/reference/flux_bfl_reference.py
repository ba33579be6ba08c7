"""Pure-torch FLUX.1 transformer forward in Black Forest Labs' (BFL) key layout.

This file is the *specification* the Rust implementation follows. It depends on
nothing but torch (+ safetensors to load a file); it does not import diffusers
or BFL's `flux` package. It follows BFL's flux/model.py + flux/modules/layers.py
step by step, written out flat so every operation is visible.

`make_goldens.py` runs this on `tests/fixtures/flux/<name>/bfl.safetensors` and
checks it reproduces diffusers' `FluxTransformer2DModel` output (max abs err is
printed; ~1e-6 in float32).

Usage as a library:
    from flux_bfl_reference import load_bfl, flux_forward
    w = load_bfl("tests/fixtures/flux/dev/bfl.safetensors")
    out = flux_forward(w, img, txt, y, timesteps, img_ids, txt_ids,
                       guidance=g, axes_dim=(2, 2, 4))

Usage as a script (compares with golden.safetensors):
    /work/venv-ref/bin/python tests/reference/flux_bfl_reference.py tests/fixtures/flux/dev

Shapes (B = batch, N = image tokens, M = text tokens, H = hidden size,
nh = heads, D = head dim = H / nh = sum(axes_dim)):
    img       [B, N, C_in]   packed latent tokens (C_in = 64 for real FLUX)
    txt       [B, M, C_txt]  T5 hidden states (C_txt = 4096 for real FLUX)
    y         [B, C_vec]     CLIP pooled output (C_vec = 768 for real FLUX)
    timesteps [B]            t in [0, 1] (sigma); multiplied by 1000 below
    guidance  [B]            distilled guidance scale (dev only), also x1000
    img_ids   [N, 3]         (0, row, col) per packed token; [B, N, 3] also ok
    txt_ids   [M, 3]         zeros
    returns   [B, N, C_in]   velocity prediction
"""

import math
import sys

import torch
import torch.nn.functional as F

THETA = 10000  # RoPE base
EPS = 1e-6  # for both LayerNorm and RMSNorm


def load_bfl(path):
    """Loads a BFL-layout safetensors file into a dict of float32 tensors.
    A ComfyUI-style `model.diffusion_model.` prefix is stripped if present."""
    from safetensors.torch import load_file

    sd = load_file(path)
    prefix = "model.diffusion_model."
    return {(k[len(prefix):] if k.startswith(prefix) else k): v.float() for k, v in sd.items()}


# --------------------------------------------------------------------------- basics


def linear(w, name, x):
    """y = x @ W^T + b, with W = w[name + '.weight'] of shape [out, in]."""
    return F.linear(x, w[name + ".weight"], w[name + ".bias"])


def layer_norm(x):
    """LayerNorm over the last dim, no affine parameters, eps 1e-6 (biased variance)."""
    mean = x.mean(dim=-1, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + EPS)


def rms_norm(x, scale):
    """RMSNorm over the last dim (the head dim), eps 1e-6, times a learned scale [D]."""
    rrms = torch.rsqrt(torch.mean(x * x, dim=-1, keepdim=True) + EPS)
    return x * rrms * scale


def gelu_tanh(x):
    """GELU, tanh approximation (torch's approximate='tanh')."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def timestep_embedding(t, dim=256, max_period=10000, time_factor=1000.0):
    """Sinusoidal embedding of t*1000: [cos(t*f_0..f_{d/2-1}), sin(...)] (cos FIRST),
    with f_i = exp(-ln(max_period) * i / (dim/2)). t: [B] -> [B, dim]."""
    t = time_factor * t
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def mlp_embedder(w, name, x):
    """BFL MLPEmbedder: out_layer(silu(in_layer(x)))."""
    return linear(w, name + ".out_layer", F.silu(linear(w, name + ".in_layer", x)))


def modulation(w, name, vec, n):
    """BFL Modulation: lin(silu(vec)) split into n chunks of size H, each [B, 1, H].
    n = 6 for double blocks: (shift1, scale1, gate1, shift2, scale2, gate2);
    n = 3 for single blocks: (shift, scale, gate)."""
    out = linear(w, name, F.silu(vec))[:, None, :]
    return out.chunk(n, dim=-1)


# --------------------------------------------------------------------------- RoPE


def rope_table(ids, axes_dim):
    """ids: [B, L, 3] (float positions). Returns cos, sin: [B, 1, L, D/2].

    For axis i with dim d_i, positions p = ids[..., i], frequencies
    omega_j = 1 / THETA^(2j/d_i) for j in 0..d_i/2, angle = p * omega_j (computed in
    float64, as BFL does). The per-axis angle tables are concatenated along the
    frequency dim in axis order, giving D/2 = sum(d_i)/2 (cos, sin) pairs."""
    angles = []
    for i, d in enumerate(axes_dim):
        scale = torch.arange(0, d, 2, dtype=torch.float64) / d
        omega = 1.0 / (THETA**scale)  # [d/2]
        angles.append(ids[..., i].double()[..., None] * omega)  # [B, L, d/2]
    ang = torch.cat(angles, dim=-1)  # [B, L, D/2]
    return torch.cos(ang).float()[:, None], torch.sin(ang).float()[:, None]


def apply_rope(x, cos, sin):
    """x: [B, nh, L, D]. Rotates INTERLEAVED pairs (x[2j], x[2j+1]) by angle j:
        out[2j]   = cos_j * x[2j] - sin_j * x[2j+1]
        out[2j+1] = sin_j * x[2j] + cos_j * x[2j+1]"""
    xp = x.reshape(*x.shape[:-1], -1, 2)  # [B, nh, L, D/2, 2]
    x0, x1 = xp[..., 0], xp[..., 1]
    out0 = cos * x0 - sin * x1
    out1 = sin * x0 + cos * x1
    return torch.stack([out0, out1], dim=-1).reshape(x.shape)


# --------------------------------------------------------------------------- attention


def split_qkv(qkv, nh):
    """[B, L, 3H] -> q, k, v each [B, nh, L, D]. Layout of the 3H dim is (K=3, nh, D)."""
    B, L, three_h = qkv.shape
    D = three_h // 3 // nh
    qkv = qkv.reshape(B, L, 3, nh, D).permute(2, 0, 3, 1, 4)  # [3, B, nh, L, D]
    return qkv[0], qkv[1], qkv[2]


def attention(q, k, v, cos, sin):
    """RoPE on q and k, softmax(q k^T / sqrt(D)) v, heads merged back: -> [B, L, nh*D]."""
    q = apply_rope(q, cos, sin)
    k = apply_rope(k, cos, sin)
    D = q.shape[-1]
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(D)  # [B, nh, L, L]
    x = torch.softmax(scores, dim=-1) @ v  # [B, nh, L, D]
    B, nh, L, _ = x.shape
    return x.permute(0, 2, 1, 3).reshape(B, L, nh * D)


# --------------------------------------------------------------------------- blocks


def double_block(w, p, img, txt, vec, cos, sin, nh):
    """BFL DoubleStreamBlock. p = 'double_blocks.{i}'. Separate weights for the image
    and text streams; joint attention over the sequence [txt, img] (text FIRST)."""
    i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = modulation(w, p + ".img_mod.lin", vec, 6)
    t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = modulation(w, p + ".txt_mod.lin", vec, 6)

    # image stream: pre-norm, modulate, qkv, per-head QK RMSNorm
    img_mod = (1 + i_scale1) * layer_norm(img) + i_shift1
    img_q, img_k, img_v = split_qkv(linear(w, p + ".img_attn.qkv", img_mod), nh)
    img_q = rms_norm(img_q, w[p + ".img_attn.norm.query_norm.scale"])
    img_k = rms_norm(img_k, w[p + ".img_attn.norm.key_norm.scale"])

    # text stream: same with txt weights
    txt_mod = (1 + t_scale1) * layer_norm(txt) + t_shift1
    txt_q, txt_k, txt_v = split_qkv(linear(w, p + ".txt_attn.qkv", txt_mod), nh)
    txt_q = rms_norm(txt_q, w[p + ".txt_attn.norm.query_norm.scale"])
    txt_k = rms_norm(txt_k, w[p + ".txt_attn.norm.key_norm.scale"])

    # joint attention over concatenated [txt, img] along the sequence dim
    q = torch.cat([txt_q, img_q], dim=2)
    k = torch.cat([txt_k, img_k], dim=2)
    v = torch.cat([txt_v, img_v], dim=2)
    attn = attention(q, k, v, cos, sin)  # [B, M+N, H]
    M = txt.shape[1]
    txt_attn, img_attn = attn[:, :M], attn[:, M:]

    # image: gated residual attention output, then gated residual MLP
    img = img + i_gate1 * linear(w, p + ".img_attn.proj", img_attn)
    h = (1 + i_scale2) * layer_norm(img) + i_shift2
    h = linear(w, p + ".img_mlp.2", gelu_tanh(linear(w, p + ".img_mlp.0", h)))
    img = img + i_gate2 * h

    # text: same with txt weights
    txt = txt + t_gate1 * linear(w, p + ".txt_attn.proj", txt_attn)
    h = (1 + t_scale2) * layer_norm(txt) + t_shift2
    h = linear(w, p + ".txt_mlp.2", gelu_tanh(linear(w, p + ".txt_mlp.0", h)))
    txt = txt + t_gate2 * h
    return img, txt


def single_block(w, p, x, vec, cos, sin, nh):
    """BFL SingleStreamBlock. p = 'single_blocks.{i}'. x is the joined [txt, img] sequence.
    linear1 produces [q | k | v | mlp] (3H + 4H), linear2 takes [attn | gelu(mlp)] (H + 4H)."""
    shift, scale, gate = modulation(w, p + ".modulation.lin", vec, 3)
    x_mod = (1 + scale) * layer_norm(x) + shift
    H = x.shape[-1]
    h1 = linear(w, p + ".linear1", x_mod)
    qkv, mlp = h1[..., : 3 * H], h1[..., 3 * H:]
    q, k, v = split_qkv(qkv, nh)
    q = rms_norm(q, w[p + ".norm.query_norm.scale"])
    k = rms_norm(k, w[p + ".norm.key_norm.scale"])
    attn = attention(q, k, v, cos, sin)
    out = linear(w, p + ".linear2", torch.cat([attn, gelu_tanh(mlp)], dim=-1))
    return x + gate * out


def final_layer(w, x, vec):
    """BFL LastLayer: adaLN_modulation = Sequential(SiLU, Linear) -> (shift, scale) in
    THAT order (diffusers' norm_out.linear stores (scale, shift): halves swapped)."""
    mod = linear(w, "final_layer.adaLN_modulation.1", F.silu(vec))
    shift, scale = mod.chunk(2, dim=-1)
    x = (1 + scale[:, None, :]) * layer_norm(x) + shift[:, None, :]
    return linear(w, "final_layer.linear", x)


# --------------------------------------------------------------------------- model


def count_blocks(w, prefix):
    idx = {int(k.split(".")[1]) for k in w if k.startswith(prefix + ".")}
    return max(idx) + 1 if idx else 0


def flux_forward(w, img, txt, y, timesteps, img_ids, txt_ids, guidance=None, axes_dim=(16, 56, 56)):
    """Full BFL Flux.forward. Hidden size H comes from img_in; heads = H / sum(axes_dim).
    Guidance is used iff the weights have guidance_in.* (dev); it is then required."""
    H = w["img_in.weight"].shape[0]
    D = sum(axes_dim)
    assert H % D == 0, (H, axes_dim)
    nh = H // D
    B = img.shape[0]

    # input projections
    img = linear(w, "img_in", img)  # [B, N, H]
    txt = linear(w, "txt_in", txt)  # [B, M, H]

    # conditioning vector: time + (guidance) + pooled text
    vec = mlp_embedder(w, "time_in", timestep_embedding(timesteps, 256))
    if "guidance_in.in_layer.weight" in w:
        if guidance is None:
            raise ValueError("guidance-distilled model needs a guidance value")
        vec = vec + mlp_embedder(w, "guidance_in", timestep_embedding(guidance, 256))
    vec = vec + mlp_embedder(w, "vector_in", y)  # [B, H]

    # positions: text ids FIRST, then image ids
    if img_ids.dim() == 2:
        img_ids = img_ids[None].expand(B, -1, -1)
    if txt_ids.dim() == 2:
        txt_ids = txt_ids[None].expand(B, -1, -1)
    ids = torch.cat([txt_ids, img_ids], dim=1)  # [B, M+N, 3]
    cos, sin = rope_table(ids, axes_dim)  # [B, 1, M+N, D/2]

    for i in range(count_blocks(w, "double_blocks")):
        img, txt = double_block(w, f"double_blocks.{i}", img, txt, vec, cos, sin, nh)

    M = txt.shape[1]
    x = torch.cat([txt, img], dim=1)
    for i in range(count_blocks(w, "single_blocks")):
        x = single_block(w, f"single_blocks.{i}", x, vec, cos, sin, nh)
    img = x[:, M:]

    return final_layer(w, img, vec)


def main():
    import json
    import os

    from safetensors.torch import load_file

    d = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/flux/dev"
    cfg = json.load(open(os.path.join(d, "diffusers", "transformer", "config.json")))
    g = load_file(os.path.join(d, "golden.safetensors"))
    for fname in ("bfl.safetensors", "comfy.safetensors"):
        w = load_bfl(os.path.join(d, fname))
        out = flux_forward(
            w, g["img"], g["txt"], g["y"], g["timesteps"], g["img_ids"], g["txt_ids"],
            guidance=g.get("guidance"), axes_dim=tuple(cfg["axes_dims_rope"]),
        )
        err = (out - g["out"]).abs().max().item()
        print(f"{d}/{fname}: max abs err vs golden out = {err:.3e} (max |out| = {g['out'].abs().max().item():.3f})")


if __name__ == "__main__":
    main()
