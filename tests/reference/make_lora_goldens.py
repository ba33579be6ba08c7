"""LoRA goldens: small LoRA files in several formats for the tiny pipeline fixtures, and the
images diffusers makes with them.

Rewrites tests/fixtures/lora/:
  {schnell,dev}/kohya.safetensors    kohya `lora_unet_*` on the BFL layout, bf16, `.alpha`
                                     (rank 4, alpha 2); img_attn.qkv as split-qkv block-diagonal
                                     factors (down [3r, h], up [3h, 3r], alpha = s * 3r);
                                     linear1, final_layer.adaLN_modulation.1, img_in, ...;
                                     plus `lora_te1_*` (CLIP, applied) and `lora_te3_*` (T5,
                                     which atelier skips, so the reference does not apply it)
  {schnell,dev}/peft.safetensors     diffusers/PEFT `transformer.*.lora_A/lora_B` on every
                                     Linear; schnell: f32 with a `lora_adapter_metadata` header
                                     (r 4, lora_alpha 8: scale 2); dev: f16, no alpha (ai-toolkit)
  dev/comfy.safetensors              ComfyUI `diffusion_model.*` lora_A/lora_B plus a `.diff`
                                     and a `.diff_b`
  dev/xlabs.safetensors              XLabs `*.processor.qkv_lora1/2, proj_lora1/2`, single
                                     `qkv_lora`
  cases.json                         case -> model kind and [file, weight] list
  <case>.png                         the reference image (uint8) for each case

References: where diffusers can load a file (PEFT), `load_lora_weights` + `set_adapters`;
otherwise an explicit merge W += m * s * B @ A in torch onto the diffusers modules, with the
fused BFL rows split onto to_q/to_k/to_v/proj_mlp and norm_out's halves swapped (diffusers'
kohya converter hard-codes FLUX.1's 3072/12288 and cannot load LoRAs for tiny models). For the
PEFT files the script checks that both ways give the same image.

Same settings as make_pipeline_goldens.py: prompt, 80x48, 3 steps, seed 42, T5 length 32,
guidance 3.5 (dev). Needs peft. Deterministic; a few seconds.

    ATELIER_TOKENIZERS=weights/tokenizers python tests/reference/make_lora_goldens.py
"""
import json
import os

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from diffusers import FluxPipeline
from transformers import CLIPTokenizer, T5TokenizerFast

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
OUT = os.path.join(ROOT, "tests", "fixtures", "lora")
TOK_DIR = os.environ.get("ATELIER_TOKENIZERS", os.path.join(ROOT, "weights", "tokenizers"))

PROMPT = "a red fox in the snow, studio photo"
SEED = 42
STEPS = 3
WIDTH, HEIGHT = 80, 48
MAX_SEQ = 32
GUIDANCE = {"schnell": 0.0, "dev": 3.5}
RANK = 4

torch.set_num_threads(2)


def load_pipe(kind):
    clip_tok = CLIPTokenizer.from_pretrained(os.path.join(TOK_DIR, "clip"))
    t5_tok = T5TokenizerFast(tokenizer_file=os.path.join(TOK_DIR, "t5", "tokenizer.json"))
    folder = os.path.join(ROOT, "tests", "fixtures", "pipeline", kind, "diffusers")
    return FluxPipeline.from_pretrained(folder, dtype=torch.float32, tokenizer=clip_tok, tokenizer_2=t5_tok)


@torch.no_grad()
def run(pipe, kind):
    img = pipe(
        PROMPT, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, guidance_scale=GUIDANCE[kind],
        max_sequence_length=MAX_SEQ, generator=torch.Generator("cpu").manual_seed(SEED), output_type="np",
    ).images[0]
    return (img * 255).round().astype(np.uint8)


# ------------------------------------------------------------- BFL names <-> diffusers modules
def bfl_linears(cfg):
    """Every BFL Linear path of a transformer config -> (out, in)."""
    h = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    mlp = 4 * h
    out = {"img_in": (h, cfg["in_channels"]), "txt_in": (h, cfg["joint_attention_dim"])}
    for e, i in [("time_in", 256), ("vector_in", cfg["pooled_projection_dim"])] + (
            [("guidance_in", 256)] if cfg["guidance_embeds"] else []):
        out[f"{e}.in_layer"] = (h, i)
        out[f"{e}.out_layer"] = (h, h)
    for b in range(cfg["num_layers"]):
        for s in ("img", "txt"):
            p = f"double_blocks.{b}.{s}"
            out.update({f"{p}_mod.lin": (6 * h, h), f"{p}_attn.qkv": (3 * h, h), f"{p}_attn.proj": (h, h),
                        f"{p}_mlp.0": (mlp, h), f"{p}_mlp.2": (h, mlp)})
    for b in range(cfg["num_single_layers"]):
        p = f"single_blocks.{b}"
        out.update({f"{p}.linear1": (3 * h + mlp, h), f"{p}.linear2": (h, h + mlp), f"{p}.modulation.lin": (3 * h, h)})
    out["final_layer.linear"] = (cfg["in_channels"], h)
    out["final_layer.adaLN_modulation.1"] = (2 * h, h)
    return out, h


def to_diffusers(path, h):
    """BFL Linear path -> list of (diffusers module, row slice of the BFL weight, swap halves)."""
    parts = path.split(".")
    if parts[0] == "double_blocks":
        b, m = parts[1], ".".join(parts[2:])
        t = f"transformer_blocks.{b}."
        return {
            "img_attn.qkv": [(t + "attn.to_q", slice(0, h), False), (t + "attn.to_k", slice(h, 2 * h), False),
                             (t + "attn.to_v", slice(2 * h, 3 * h), False)],
            "txt_attn.qkv": [(t + f"attn.add_{x}_proj", slice(i * h, (i + 1) * h), False) for i, x in enumerate("qkv")],
            "img_attn.proj": [(t + "attn.to_out.0", slice(None), False)],
            "txt_attn.proj": [(t + "attn.to_add_out", slice(None), False)],
            "img_mlp.0": [(t + "ff.net.0.proj", slice(None), False)],
            "img_mlp.2": [(t + "ff.net.2", slice(None), False)],
            "txt_mlp.0": [(t + "ff_context.net.0.proj", slice(None), False)],
            "txt_mlp.2": [(t + "ff_context.net.2", slice(None), False)],
            "img_mod.lin": [(t + "norm1.linear", slice(None), False)],
            "txt_mod.lin": [(t + "norm1_context.linear", slice(None), False)],
        }[m]
    if parts[0] == "single_blocks":
        b, m = parts[1], ".".join(parts[2:])
        t = f"single_transformer_blocks.{b}."
        return {
            "linear1": [(t + "attn.to_q", slice(0, h), False), (t + "attn.to_k", slice(h, 2 * h), False),
                        (t + "attn.to_v", slice(2 * h, 3 * h), False), (t + "proj_mlp", slice(3 * h, None), False)],
            "linear2": [(t + "proj_out", slice(None), False)],
            "modulation.lin": [(t + "norm.linear", slice(None), False)],
        }[m]
    emb = {"time_in": "timestep_embedder", "vector_in": "text_embedder", "guidance_in": "guidance_embedder"}
    if parts[0] in emb:
        lin = {"in_layer": "linear_1", "out_layer": "linear_2"}[parts[1]]
        return [(f"time_text_embed.{emb[parts[0]]}.{lin}", slice(None), False)]
    return [{
        "img_in": ("x_embedder", slice(None), False),
        "txt_in": ("context_embedder", slice(None), False),
        "final_layer.linear": ("proj_out", slice(None), False),
        "final_layer.adaLN_modulation.1": ("norm_out.linear", slice(None), True),
    }[path]]


def from_diffusers(module, h):
    """diffusers module -> (BFL path, row slice)."""
    for path in BFL_PATHS:
        for m, rows, swap in to_diffusers(path, h):
            if m == module:
                return path, rows, swap
    raise KeyError(module)


# ----------------------------------------------------------------------------- factors
class Gen:
    def __init__(self, seed):
        self.g = torch.Generator().manual_seed(seed)

    def factors(self, out, inp, r=RANK, amp=0.6):
        a = torch.randn(r, inp, generator=self.g) / inp ** 0.5
        b = torch.randn(out, r, generator=self.g) * amp / r ** 0.5
        return a, b


def rounded(t, dtype):
    return t.to(dtype).to(torch.float32)


def make_kohya(kind, cfg, clip_layers, clip_h, clip_ff, seed):
    """kohya lora_unet_* (+ te1, te3). Returns (tensors, deltas) with deltas =
    {("flux"|"clip", path): (dW f32 [out, in], None)} per unit weight."""
    lin, h = bfl_linears(cfg)
    gen, sd, deltas = Gen(seed), {}, {}
    alpha = 2.0
    for path, (o, i) in lin.items():
        name = "lora_unet_" + path.replace(".", "_")
        if path.endswith("img_attn.qkv"):
            # split-qkv: block-diagonal up, alpha = s * 3r with s = 0.5
            parts = [gen.factors(h, i) for _ in range(3)]
            down = torch.cat([a for a, _ in parts])
            up = torch.block_diag(*[b for _, b in parts])
            a_val = 0.5 * 3 * RANK
        else:
            down, up = gen.factors(o, i)
            a_val = alpha
        down, up = rounded(down, torch.bfloat16), rounded(up, torch.bfloat16)
        sd[name + ".lora_down.weight"] = down.to(torch.bfloat16)
        sd[name + ".lora_up.weight"] = up.to(torch.bfloat16)
        sd[name + ".alpha"] = torch.tensor(a_val, dtype=torch.bfloat16)
        deltas[("flux", path)] = ((a_val / down.shape[0]) * up @ down, None)
    for layer in range(clip_layers):
        for m, (o, i) in {"self_attn_q_proj": (clip_h, clip_h), "self_attn_v_proj": (clip_h, clip_h),
                          "mlp_fc1": (clip_ff, clip_h)}.items():
            name = f"lora_te1_text_model_encoder_layers_{layer}_{m}"
            down, up = gen.factors(o, i, r=2, amp=1.5)
            down, up = rounded(down, torch.bfloat16), rounded(up, torch.bfloat16)
            sd[name + ".lora_down.weight"] = down.to(torch.bfloat16)
            sd[name + ".lora_up.weight"] = up.to(torch.bfloat16)
            sd[name + ".alpha"] = torch.tensor(2.0, dtype=torch.bfloat16)
            path = f"encoder.layers.{layer}.{m.replace('self_attn_', 'self_attn.').replace('mlp_', 'mlp.')}"
            deltas[("clip", path)] = (up @ down, None)
    # A T5 module: atelier skips it (and says so), so the reference leaves it out.
    sd["lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight"] = torch.zeros(2, 8, dtype=torch.bfloat16)
    sd["lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight"] = torch.zeros(8, 2, dtype=torch.bfloat16)
    return sd, {}, deltas


def make_peft(kind, transformer, seed, dtype, metadata_alpha):
    """diffusers/PEFT keys on every nn.Linear of the transformer."""
    gen, sd, deltas = Gen(seed), {}, {}
    h = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    scale = metadata_alpha / RANK if metadata_alpha else 1.0
    for name, mod in transformer.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        a, b = gen.factors(mod.out_features, mod.in_features, amp=0.4)
        a, b = rounded(a, dtype), rounded(b, dtype)
        sd[f"transformer.{name}.lora_A.weight"] = a.to(dtype)
        sd[f"transformer.{name}.lora_B.weight"] = b.to(dtype)
        path, rows, swap = from_diffusers(name, h)
        deltas.setdefault(("flux", path), []).append((rows, swap, scale * b @ a))
    meta = {}
    if metadata_alpha:
        # As diffusers' save_lora_weights writes it: the PEFT config, keys prefixed by component.
        meta["lora_adapter_metadata"] = json.dumps({
            "transformer.r": RANK, "transformer.lora_alpha": metadata_alpha,
            "transformer.target_modules": sorted({k.split(".lora_")[0][len("transformer."):] for k in sd}),
        }, indent=2, sort_keys=True)
    return sd, meta, fuse(deltas, kind_linears(transformer))


def kind_linears(transformer):
    lin, _ = bfl_linears(dict(transformer.config))
    return lin


def fuse(parts, lin):
    """Row-block deltas -> full BFL deltas."""
    out = {}
    for key, items in parts.items():
        o, i = lin[key[1]]
        d = torch.zeros(o, i)
        for rows, swap, dw in items:
            if swap:
                dw = torch.cat([dw[o // 2:], dw[:o // 2]])
            d[rows] += dw
        out[key] = (d, None)
    return out


def make_comfy(cfg, seed):
    lin, h = bfl_linears(cfg)
    gen, sd, deltas = Gen(seed), {}, {}
    for path, (o, i) in lin.items():
        name = "diffusion_model." + path
        if path == "txt_in":
            d = torch.randn(o, i, generator=gen.g) * 0.3 / i ** 0.5
            bias = torch.randn(o, generator=gen.g) * 0.2
            sd[name + ".diff"] = d.to(torch.float16)
            sd[name + ".diff_b"] = bias.to(torch.float16)
            deltas[("flux", path)] = (rounded(d, torch.float16), rounded(bias, torch.float16))
            continue
        a, b = gen.factors(o, i, amp=0.5)
        sd[name + ".lora_A.weight"] = a
        sd[name + ".lora_B.weight"] = b
        deltas[("flux", path)] = (b @ a, None)
    return sd, {}, deltas


def make_xlabs(cfg, seed):
    lin, h = bfl_linears(cfg)
    gen, sd, deltas = Gen(seed), {}, {}
    for b in range(cfg["num_layers"]):
        for key, path in [("qkv_lora1", "img_attn.qkv"), ("qkv_lora2", "txt_attn.qkv"),
                          ("proj_lora1", "img_attn.proj"), ("proj_lora2", "txt_attn.proj")]:
            o, i = lin[f"double_blocks.{b}.{path}"]
            a, u = gen.factors(o, i, amp=0.8)
            sd[f"double_blocks.{b}.processor.{key}.down.weight"] = a
            sd[f"double_blocks.{b}.processor.{key}.up.weight"] = u
            deltas[("flux", f"double_blocks.{b}.{path}")] = (u @ a, None)
    for b in range(cfg["num_single_layers"]):
        o, i = lin[f"single_blocks.{b}.linear1"]
        a, u = gen.factors(3 * h, i, amp=0.8)
        sd[f"single_blocks.{b}.processor.qkv_lora.down.weight"] = a
        sd[f"single_blocks.{b}.processor.qkv_lora.up.weight"] = u
        d = torch.zeros(o, i)
        d[:3 * h] = u @ a
        deltas[("flux", f"single_blocks.{b}.linear1")] = (d, None)
    return sd, {}, deltas


# ------------------------------------------------------------------------------- merging
def find(module_root, suffix):
    for name, mod in module_root.named_modules():
        if name == suffix or name.endswith("." + suffix):
            return mod
    raise KeyError(suffix)


@torch.no_grad()
def merge(pipe, deltas, weight):
    h = pipe.transformer.config.num_attention_heads * pipe.transformer.config.attention_head_dim
    for (part, path), (dw, db) in deltas.items():
        if part == "clip":
            mod = find(pipe.text_encoder, path)
            mod.weight += weight * dw
            continue
        for module, rows, swap in to_diffusers(path, h):
            mod = pipe.transformer.get_submodule(module)
            d = dw
            if swap:
                o = d.shape[0]
                d = torch.cat([d[o // 2:], d[:o // 2]])
            mod.weight += weight * d[rows]
            if db is not None:
                mod.bias += weight * db[rows]


def main():
    os.makedirs(OUT, exist_ok=True)
    cases = {
        "schnell_kohya": ("schnell", [("kohya", 0.8)]),
        "schnell_peft": ("schnell", [("peft", 0.8)]),
        "dev_kohya": ("dev", [("kohya", 0.8)]),
        "dev_peft_kohya": ("dev", [("peft", 0.8), ("kohya", -0.6)]),
        "dev_comfy_xlabs": ("dev", [("comfy", 1.0), ("xlabs", 0.7)]),
    }
    files = {}
    for kind, seed in [("schnell", 100), ("dev", 200)]:
        pipe = load_pipe(kind)
        cfg = dict(pipe.transformer.config)
        global BFL_PATHS
        BFL_PATHS = list(bfl_linears(cfg)[0])
        tc = pipe.text_encoder.config
        made = {
            "kohya": make_kohya(kind, cfg, tc.num_hidden_layers, tc.hidden_size, tc.intermediate_size, seed + 1),
            "peft": make_peft(kind, pipe.transformer, seed + 2, torch.float32 if kind == "schnell" else torch.float16,
                              8.0 if kind == "schnell" else None),
        }
        if kind == "dev":
            made["comfy"] = make_comfy(cfg, seed + 3)
            made["xlabs"] = make_xlabs(cfg, seed + 4)
        os.makedirs(os.path.join(OUT, kind), exist_ok=True)
        for name, (sd, meta, deltas) in made.items():
            path = os.path.join(OUT, kind, f"{name}.safetensors")
            save_file({k: v.contiguous() for k, v in sd.items()}, path, metadata=meta or None)
            files[(kind, name)] = (path, deltas)
        del pipe
    out_cases = {}
    for case, (kind, loras) in cases.items():
        pipe = load_pipe(kind)
        peft = [(n, w) for n, w in loras if n == "peft"]
        for name, w in loras:
            if name != "peft":
                merge(pipe, files[(kind, name)][1], w)
        if peft:
            # Both ways: the explicit merge, then diffusers' own loader on a fresh pipeline.
            merged = load_pipe(kind)
            for name, w in loras:
                merge(merged, files[(kind, name)][1], w)
            by_merge = run(merged, kind)
            pipe.load_lora_weights(files[(kind, "peft")][0], adapter_name="peft")
            pipe.set_adapters(["peft"], [peft[0][1]])
        image = run(pipe, kind)
        if peft:
            worst = np.abs(image.astype(int) - by_merge.astype(int)).max()
            assert worst <= 1, f"{case}: diffusers' loader and the explicit merge differ by {worst}/255"
        plain = run(load_pipe(kind), kind)
        change = np.abs(image.astype(int) - plain.astype(int))
        print(f"{case}: pixels vs no LoRA: mean {change.mean():.1f}/255, max {change.max()}/255")
        assert change.mean() > 3, f"{case}: the LoRA barely changes the image"
        Image.fromarray(image).save(os.path.join(OUT, f"{case}.png"), optimize=False)
        out_cases[case] = {"kind": kind, "loras": [[f"{kind}/{n}.safetensors", w] for n, w in loras]}
    with open(os.path.join(OUT, "cases.json"), "w") as f:
        json.dump(out_cases, f, indent=2, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main()
