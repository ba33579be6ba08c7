"""diffusers FluxTransformer2DModel state dict -> Black Forest Labs (BFL) key layout.

The exact inverse of diffusers' scripts/convert_flux_to_diffusers.py (and of
diffusers.loaders.single_file_utils.convert_flux_transformer_checkpoint_to_diffusers,
which make_goldens.py uses to check the round trip):

  BFL                                          diffusers
  img_in                                       x_embedder
  txt_in                                       context_embedder
  time_in.{in,out}_layer                       time_text_embed.timestep_embedder.linear_{1,2}
  vector_in.{in,out}_layer                     time_text_embed.text_embedder.linear_{1,2}
  guidance_in.{in,out}_layer (dev)             time_text_embed.guidance_embedder.linear_{1,2}
  double_blocks.N.img_mod.lin                  transformer_blocks.N.norm1.linear
  double_blocks.N.txt_mod.lin                  transformer_blocks.N.norm1_context.linear
  double_blocks.N.img_attn.qkv                 cat rows(attn.to_q, attn.to_k, attn.to_v)
  double_blocks.N.txt_attn.qkv                 cat rows(attn.add_q_proj, add_k_proj, add_v_proj)
  double_blocks.N.img_attn.norm.query_norm.scale  attn.norm_q.weight
  double_blocks.N.img_attn.norm.key_norm.scale    attn.norm_k.weight
  double_blocks.N.txt_attn.norm.query_norm.scale  attn.norm_added_q.weight
  double_blocks.N.txt_attn.norm.key_norm.scale    attn.norm_added_k.weight
  double_blocks.N.img_attn.proj                attn.to_out.0
  double_blocks.N.txt_attn.proj                attn.to_add_out
  double_blocks.N.img_mlp.{0,2}                ff.net.0.proj, ff.net.2
  double_blocks.N.txt_mlp.{0,2}                ff_context.net.0.proj, ff_context.net.2
  single_blocks.N.linear1                      cat rows(attn.to_q, to_k, to_v, proj_mlp)
  single_blocks.N.linear2                      proj_out
  single_blocks.N.norm.query_norm.scale        attn.norm_q.weight
  single_blocks.N.norm.key_norm.scale          attn.norm_k.weight
  single_blocks.N.modulation.lin               norm.linear
  final_layer.linear                           proj_out
  final_layer.adaLN_modulation.1               norm_out.linear with the two halves SWAPPED
                                               (diffusers: (scale, shift); BFL: (shift, scale))
"""

import torch


def _swap_halves(t):
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def diffusers_to_bfl(sd, num_layers, num_single_layers):
    """sd: diffusers state dict (name -> tensor). Returns a new dict in BFL layout,
    float32 and contiguous. Every input key is consumed exactly once (asserted)."""
    used = set()
    out = {}

    def take(k):
        used.add(k)
        return sd[k]

    def lin(dst, src):
        out[dst + ".weight"] = take(src + ".weight")
        out[dst + ".bias"] = take(src + ".bias")

    def cat_lin(dst, srcs):
        out[dst + ".weight"] = torch.cat([take(s + ".weight") for s in srcs], dim=0)
        out[dst + ".bias"] = torch.cat([take(s + ".bias") for s in srcs], dim=0)

    lin("img_in", "x_embedder")
    lin("txt_in", "context_embedder")
    lin("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1")
    lin("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2")
    lin("vector_in.in_layer", "time_text_embed.text_embedder.linear_1")
    lin("vector_in.out_layer", "time_text_embed.text_embedder.linear_2")
    if "time_text_embed.guidance_embedder.linear_1.weight" in sd:
        lin("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1")
        lin("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2")

    for i in range(num_layers):
        s, d = f"transformer_blocks.{i}", f"double_blocks.{i}"
        lin(f"{d}.img_mod.lin", f"{s}.norm1.linear")
        lin(f"{d}.txt_mod.lin", f"{s}.norm1_context.linear")
        cat_lin(f"{d}.img_attn.qkv", [f"{s}.attn.to_q", f"{s}.attn.to_k", f"{s}.attn.to_v"])
        cat_lin(f"{d}.txt_attn.qkv", [f"{s}.attn.add_q_proj", f"{s}.attn.add_k_proj", f"{s}.attn.add_v_proj"])
        out[f"{d}.img_attn.norm.query_norm.scale"] = take(f"{s}.attn.norm_q.weight")
        out[f"{d}.img_attn.norm.key_norm.scale"] = take(f"{s}.attn.norm_k.weight")
        out[f"{d}.txt_attn.norm.query_norm.scale"] = take(f"{s}.attn.norm_added_q.weight")
        out[f"{d}.txt_attn.norm.key_norm.scale"] = take(f"{s}.attn.norm_added_k.weight")
        lin(f"{d}.img_attn.proj", f"{s}.attn.to_out.0")
        lin(f"{d}.txt_attn.proj", f"{s}.attn.to_add_out")
        lin(f"{d}.img_mlp.0", f"{s}.ff.net.0.proj")
        lin(f"{d}.img_mlp.2", f"{s}.ff.net.2")
        lin(f"{d}.txt_mlp.0", f"{s}.ff_context.net.0.proj")
        lin(f"{d}.txt_mlp.2", f"{s}.ff_context.net.2")

    for i in range(num_single_layers):
        s, d = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        cat_lin(f"{d}.linear1", [f"{s}.attn.to_q", f"{s}.attn.to_k", f"{s}.attn.to_v", f"{s}.proj_mlp"])
        lin(f"{d}.linear2", f"{s}.proj_out")
        out[f"{d}.norm.query_norm.scale"] = take(f"{s}.attn.norm_q.weight")
        out[f"{d}.norm.key_norm.scale"] = take(f"{s}.attn.norm_k.weight")
        lin(f"{d}.modulation.lin", f"{s}.norm.linear")

    lin("final_layer.linear", "proj_out")
    out["final_layer.adaLN_modulation.1.weight"] = _swap_halves(take("norm_out.linear.weight"))
    out["final_layer.adaLN_modulation.1.bias"] = _swap_halves(take("norm_out.linear.bias"))

    unused = set(sd) - used
    assert not unused, f"diffusers keys not converted: {sorted(unused)}"
    return {k: v.detach().float().contiguous().clone() for k, v in out.items()}
