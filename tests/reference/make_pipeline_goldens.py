"""Writes the end-to-end text-to-image goldens under tests/fixtures/pipeline/ from diffusers.

Run by hand (never by CI), from the repository root, with the reference venv
(see tests/reference/README.md):

    nice -n 10 /work/venv-ref/bin/python tests/reference/make_pipeline_goldens.py

Two tiny random FluxPipelines (schnell-like and dev-like) with the REAL tokenizers
(/work/shared/data/tokenizers, or $ATELIER_TOKENIZERS), tiny random T5 / CLIP / VAE /
FLUX transformer, 80x48 (width x height), 3 steps, seed 42, max_sequence_length 32.
The text encoders and the VAE are identical in both pipelines (same seeds).

It is deterministic (fixed seeds; CPU float32; two runs give byte-identical files) and
rewrites tests/fixtures/pipeline/{schnell,dev,single}/ (README.md there, hand-written, describes every file):

  {schnell,dev}/diffusers/     FluxPipeline.save_pretrained, components recast to the real repos'
                               dtypes (text_encoder f16, text_encoder_2 + transformer bf16, vae f32);
                               tokenizer/ and tokenizer_2/ dropped (6 MB each; = the shared files)
  {schnell,dev}/golden.safetensors   token ids, encoder outputs, noise, sigmas, per-step
                               latents/velocities, final latents, image, VAE encode/decode goldens
  {schnell,dev}/diffusers.png  the diffusers image, for eyeballing
  single/                      the same weights as single files (BFL / ComfyUI style):
      flux_schnell_bfl.safetensors, flux_dev_bfl.safetensors   transformer, BFL keys, bf16
      ae.safetensors           VAE, BFL/LDM "ae.safetensors" keys, f32
      clip_l.safetensors       CLIPTextModel keys with the text_model. prefix, f16
      t5xxl.safetensors        T5EncoderModel keys (shared.weight, encoder.*), f16
  All weights are rounded first so that every stored value is exact in its file's dtype.

Checks made on the way (the script fails if one does not hold):
  * both tokenizers reproduce /work/shared/data/tokenizers/expected.json exactly;
  * the noise the pipeline draws equals torch.randn([1,16,6,10], Generator(cpu).manual_seed(42))
    packed with FluxPipeline._pack_latents (captured by wrapping prepare_latents);
  * the saved diffusers folders load back with FluxPipeline.from_pretrained and give the same image;
  * ae.safetensors converts back to exactly the diffusers VAE state dict through diffusers' own
    convert_ldm_vae_checkpoint, and loads through AutoencoderKL.from_single_file;
  * flux_*_bfl.safetensors converts back exactly through diffusers' single-file converter;
  * a from-scratch pipeline that only uses the single files (tokenizers library on the
    tokenizer.json files, clip_l/t5xxl loaded into transformers models, the pure-torch BFL
    transformer of flux_bfl_reference.py, a hand-written Euler loop with the schedule
    computed from the formula, diffusers' VAE loaded from ae.safetensors) reproduces the
    diffusers image; max errors are printed.
"""

import inspect
import json
import math
import os
import shutil
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import diffusers  # noqa: E402
import transformers  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
)
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import (  # noqa: E402
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from flux_bfl_reference import flux_forward, load_bfl  # noqa: E402
from flux_convert import diffusers_to_bfl  # noqa: E402
from make_goldens import SCHEDULER_CONFIGS, diffusers_single_file_converter  # noqa: E402

ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
OUT = os.path.join(ROOT, "tests", "fixtures", "pipeline")
TOK_DIR = os.environ.get("ATELIER_TOKENIZERS", "/work/shared/data/tokenizers")

PROMPT = "a red fox in the snow, studio photo"
# > 77 CLIP tokens and > 32 T5 tokens: exercises truncation (token and encoder goldens only).
LONG_PROMPT = (
    "A highly detailed photograph of a red fox sitting in fresh powder snow at dawn, soft golden "
    "light from the left, shallow depth of field, bokeh of pine trees in the background, frost on "
    "its whiskers, breath visible in the cold air, shot on a medium format camera with an 80mm lens "
    "at f/2.8, ultra sharp fur texture, subtle film grain, natural colors, award winning wildlife "
    "photography, National Geographic style, 8k resolution, trending on artstation"
)
SEED = 42
STEPS = 3
WIDTH, HEIGHT = 80, 48
MAX_SEQ = 32
GUIDANCE = {"schnell": 0.0, "dev": 3.5}

# ---------------------------------------------------------------- tiny component configs
T5_CFG = dict(
    vocab_size=32128,  # the real T5 v1.1 embedding rows (tokenizer has 32100 pieces)
    d_model=8, d_kv=8, num_heads=4, d_ff=32, num_layers=2,
    feed_forward_proj="gated-gelu",  # -> dense_act_fn gelu_new (tanh GELU), is_gated_act True
    relative_attention_num_buckets=32, relative_attention_max_distance=128,
    layer_norm_epsilon=1e-6, dropout_rate=0.0, tie_word_embeddings=False,
    pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
)
CLIP_CFG = dict(
    vocab_size=49408, hidden_size=4, intermediate_size=16, num_hidden_layers=2,
    num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu",
    layer_norm_eps=1e-5, projection_dim=4,
    # The real FLUX.1 text_encoder/config.json (openai/clip-vit-large-patch14) has the legacy
    # bos 0 / eos 2 / pad 1: transformers then pools at input_ids.argmax(-1), i.e. the first
    # 49407 (the largest id). Kept here on purpose; see README.md ("CLIP pooled rule").
    bos_token_id=0, eos_token_id=2, pad_token_id=1,
)
VAE_CFG = dict(
    in_channels=3, out_channels=3, latent_channels=16,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[8, 8, 16, 16],  # 4 blocks: downsample factor 8, as FLUX's (128,256,512,512)
    layers_per_block=2, act_fn="silu", norm_num_groups=4, sample_size=64,
    scaling_factor=0.3611, shift_factor=0.1159,
    use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True,
    force_upcast=True,
)
FLUX_CFG = {
    kind: dict(
        patch_size=1, in_channels=64, out_channels=None, num_layers=2, num_single_layers=2,
        attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=T5_CFG["d_model"], pooled_projection_dim=CLIP_CFG["hidden_size"],
        guidance_embeds=(kind == "dev"), axes_dims_rope=(4, 6, 6),
    )
    for kind in ("schnell", "dev")
}
# dtype each weights file is stored in, as in the real files: FLUX.1-{dev,schnell} on the Hub has
# transformer/ and text_encoder_2/ in bf16, text_encoder/ in f16; BFL's flux1-*.safetensors is bf16,
# ae.safetensors f32, ComfyUI's clip_l.safetensors / t5xxl_fp16.safetensors f16. The weights are
# rounded so that every stored value is exact: upcast to f32 they are the weights the goldens used.
STORE_DTYPES = {
    "diffusers/text_encoder": torch.float16, "diffusers/text_encoder_2": torch.bfloat16,
    "diffusers/transformer": torch.bfloat16, "diffusers/vae": torch.float32,
    "clip_l": torch.float16, "t5xxl": torch.float16, "flux_bfl": torch.bfloat16, "ae": torch.float32,
}
DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}
SEEDS = {"t5": 101, "clip": 202, "vae": 303, "schnell": 404, "dev": 505}


def write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def f32(d):
    return {k: v.detach().to(torch.float32).contiguous().clone() for k, v in d.items()}


def as_dtype(d, dtype):
    """Casts to dtype, asserting that no value changes."""
    out = {}
    for k, v in d.items():
        c = v.detach().to(dtype).contiguous().clone()
        assert torch.equal(c.to(torch.float32), v.detach().to(torch.float32)), (k, dtype)
        out[k] = c
    return out


def recast_folder(folder, dtype):
    """Rewrites the one *.safetensors of a saved component folder in dtype (values unchanged)
    and, for transformers configs, its "dtype" field."""
    files = [f for f in os.listdir(folder) if f.endswith(".safetensors")]
    assert len(files) == 1, files
    path = os.path.join(folder, files[0])
    save_file(as_dtype(load_file(path), dtype), path, metadata={"format": "pt"})
    cfg_path = os.path.join(folder, "config.json")
    cfg = json.load(open(cfg_path))
    if "dtype" in cfg:
        cfg["dtype"] = DTYPE_NAMES[dtype]
        write_json(cfg_path, cfg)


@torch.no_grad()
def reinit(module, seed, emb_std=1.0, gains=None):
    """Every parameter re-drawn from a seeded generator: weights randn * gain / sqrt(fan_in),
    nn.Embedding tables randn * emb_std, biases randn * 0.05, 1-D norm/scale weights 1 + 0.1 * randn.
    gains: {name suffix: gain} overrides (default gain 1)."""
    g = torch.Generator("cpu").manual_seed(seed)
    gains = gains or {}
    emb = {f"{n}.weight" for n, m in module.named_modules() if isinstance(m, torch.nn.Embedding)}
    for name, p in module.named_parameters():  # definition order: deterministic
        r = torch.randn(p.shape, generator=g, dtype=torch.float32)
        if p.ndim == 1:
            if name.endswith("bias"):
                p.copy_(0.05 * r)
            else:
                p.copy_(1.0 + 0.1 * r)
        elif name in emb:  # nn.Embedding tables (token, position, T5 relative bias)
            p.copy_(emb_std * r)
        else:
            gain = next((v for k, v in gains.items() if name.endswith(k)), 1.0)
            fan_in = p[0].numel()
            p.copy_(r * gain / math.sqrt(fan_in))
    return module.eval()


def _exact_in(x, dtypes):
    return all(torch.equal(x.to(d).to(torch.float32), x) for d in dtypes)


@torch.no_grad()
def round_to(module, dtypes):
    """Rounds every parameter to values that are exact in each of dtypes, so that the same
    weights can be stored as f32 (goldens, computed in f32) and as bf16/f16 files."""
    for name, p in module.named_parameters():
        x = p.detach().to(torch.float32)
        for _ in range(8):
            for d in dtypes:
                x = x.to(d).to(torch.float32)
            if _exact_in(x, dtypes):
                break
        assert _exact_in(x, dtypes), name
        p.copy_(x)
    return module


def build_components():
    t5 = reinit(T5EncoderModel(T5Config(**T5_CFG)), SEEDS["t5"], emb_std=1.0)
    clip = reinit(CLIPTextModel(CLIPTextConfig(**CLIP_CFG)), SEEDS["clip"], emb_std=0.5)
    vae = reinit(AutoencoderKL(**VAE_CFG), SEEDS["vae"], gains={"decoder.conv_out.weight": 1.0})
    flux = {}
    for kind in ("schnell", "dev"):
        flux[kind] = reinit(FluxTransformer2DModel(**FLUX_CFG[kind]), SEEDS[kind], emb_std=1.0)
    # Stored as the real files are (see STORE_DTYPES); values exact in those dtypes.
    round_to(t5, [torch.bfloat16, torch.float16])
    round_to(clip, [torch.float16])
    for m in flux.values():
        round_to(m, [torch.bfloat16])
    return t5, clip, vae, flux


def load_tokenizers():
    t5_tok = T5TokenizerFast(tokenizer_file=os.path.join(TOK_DIR, "t5", "tokenizer.json"))
    clip_tok = CLIPTokenizer.from_pretrained(os.path.join(TOK_DIR, "clip"))
    assert clip_tok.model_max_length == 77 and clip_tok.pad_token_id == 49407
    assert t5_tok.pad_token_id == 0 and t5_tok.eos_token_id == 1
    expected = json.load(open(os.path.join(TOK_DIR, "expected.json")))
    for prompt, ids in expected.items():
        assert t5_tok(prompt).input_ids == ids["t5"], ("t5", prompt)
        assert clip_tok(prompt).input_ids == ids["clip"], ("clip", prompt)
    print(f"tokenizers: {type(t5_tok).__name__} ({len(t5_tok)}), {type(clip_tok).__name__} ({len(clip_tok)}); "
          f"expected.json ({len(expected)} prompts) reproduced exactly")
    return t5_tok, clip_tok


# ---------------------------------------------------------------- BFL / LDM VAE layout
def vae_diffusers_to_ldm(sd, n_blocks, layers_per_block):
    """diffusers AutoencoderKL state dict -> the original LDM / BFL `ae.safetensors` layout.
    The exact inverse of diffusers.loaders.single_file_utils.convert_ldm_vae_checkpoint
    (checked below). Every input key is consumed exactly once."""
    out, used = {}, set()

    def put(dst, src, conv1x1=False):
        t = sd[src]
        used.add(src)
        if conv1x1 and t.ndim == 2:
            t = t[:, :, None, None]  # Linear [C, C] -> 1x1 conv [C, C, 1, 1]
        out[dst] = t

    def resnet(dst, src):
        for a, b in (("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2"),
                     ("nin_shortcut", "conv_shortcut")):
            for wb in ("weight", "bias"):
                if f"{src}.{b}.{wb}" in sd:
                    put(f"{dst}.{a}.{wb}", f"{src}.{b}.{wb}")

    def attn(dst, src):
        for a, b in (("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
            for wb in ("weight", "bias"):
                put(f"{dst}.{a}.{wb}", f"{src}.{b}.{wb}", conv1x1=(a != "norm"))

    for part in ("encoder", "decoder"):
        for wb in ("weight", "bias"):
            put(f"{part}.conv_in.{wb}", f"{part}.conv_in.{wb}")
            put(f"{part}.conv_out.{wb}", f"{part}.conv_out.{wb}")
            put(f"{part}.norm_out.{wb}", f"{part}.conv_norm_out.{wb}")
        for j in (1, 2):
            resnet(f"{part}.mid.block_{j}", f"{part}.mid_block.resnets.{j - 1}")
        attn(f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0")
    for i in range(n_blocks):
        for r in range(layers_per_block):
            resnet(f"encoder.down.{i}.block.{r}", f"encoder.down_blocks.{i}.resnets.{r}")
        if i != n_blocks - 1:
            for wb in ("weight", "bias"):
                put(f"encoder.down.{i}.downsample.conv.{wb}", f"encoder.down_blocks.{i}.downsamplers.0.conv.{wb}")
    for i in range(n_blocks):  # diffusers up_blocks.i == LDM up.(n-1-i)
        b = n_blocks - 1 - i
        for r in range(layers_per_block + 1):
            resnet(f"decoder.up.{b}.block.{r}", f"decoder.up_blocks.{i}.resnets.{r}")
        if i != n_blocks - 1:
            for wb in ("weight", "bias"):
                put(f"decoder.up.{b}.upsample.conv.{wb}", f"decoder.up_blocks.{i}.upsamplers.0.conv.{wb}")
    missing = set(sd) - used
    assert not missing, sorted(missing)
    return out


# ---------------------------------------------------------------- running diffusers
def make_pipe(kind, t5, clip, vae, flux, t5_tok, clip_tok):
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(SCHEDULER_CONFIGS[kind]),
        vae=vae, text_encoder=clip, tokenizer=clip_tok, text_encoder_2=t5, tokenizer_2=t5_tok,
        transformer=flux,
    )


@torch.no_grad()
def run_pipe(pipe, kind, output_type, capture=None):
    """Runs the pipeline; with capture (a dict) also records what it used inside."""
    orig_prepare = pipe.prepare_latents
    hooks = []
    if capture is not None:
        capture.update(latents_steps=[], velocities=[], t_in=[])

        def prepare(*a, **k):
            lat, ids = orig_prepare(*a, **k)
            capture["noise_packed"] = lat.clone()
            capture["img_ids"] = ids.clone()
            return lat, ids
        pipe.prepare_latents = prepare

        def tf_hook(mod, args, kwargs, out):
            capture["velocities"].append(out[0].clone())
            capture["t_in"].append(kwargs["timestep"].clone())
            capture["txt_ids"] = kwargs["txt_ids"].clone()
            capture["t5_out_in"] = kwargs["encoder_hidden_states"].clone()
            capture["pooled_in"] = kwargs["pooled_projections"].clone()
            if kwargs.get("guidance") is not None:
                capture["guidance_in"] = kwargs["guidance"].clone()
        hooks.append(pipe.transformer.register_forward_hook(tf_hook, with_kwargs=True))

        hooks.append(pipe.vae.decoder.register_forward_hook(
            lambda m, a, k, o: capture.update(decoder_in=a[0].clone()), with_kwargs=True))

    def on_step(p, i, t, kw):
        if capture is not None:
            capture["latents_steps"].append(kw["latents"].clone())
        return {}

    try:
        out = pipe(
            PROMPT, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS,
            guidance_scale=GUIDANCE[kind], max_sequence_length=MAX_SEQ,
            generator=torch.Generator("cpu").manual_seed(SEED), output_type=output_type,
            callback_on_step_end=on_step, callback_on_step_end_tensor_inputs=["latents"],
        ).images
    finally:
        pipe.prepare_latents = orig_prepare
        for h in hooks:
            h.remove()
    if capture is not None:
        capture["sigmas"] = pipe.scheduler.sigmas.clone()
        capture["timesteps"] = pipe.scheduler.timesteps.clone()
    return out


@torch.no_grad()
def encode_text(pipe, prompt):
    t5_ids = pipe.tokenizer_2(prompt, padding="max_length", max_length=MAX_SEQ, truncation=True,
                              return_tensors="pt").input_ids
    clip_ids = pipe.tokenizer(prompt, padding="max_length", max_length=77, truncation=True,
                              return_tensors="pt").input_ids
    t5_out = pipe.text_encoder_2(t5_ids, output_hidden_states=False)[0]
    clip_out = pipe.text_encoder(clip_ids, output_hidden_states=False)
    return t5_ids, clip_ids, t5_out, clip_out.pooler_output, clip_out.last_hidden_state


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


# ---------------------------------------------------------------- an independent re-implementation
@torch.no_grad()
def from_scratch(kind, single_dir):
    """prompt -> image with only the single files and the written-down rules (what the Rust
    engine does). Returns (t5_out, clip_pooled, final packed latents, image [H,W,3] in [0,1])."""
    from tokenizers import Tokenizer

    t5_tok = Tokenizer.from_file(os.path.join(TOK_DIR, "t5", "tokenizer.json"))
    clip_tok = Tokenizer.from_file(os.path.join(TOK_DIR, "clip", "tokenizer.json"))
    # T5: encode (adds </s>=1), truncate to MAX_SEQ keeping the </s> last, pad with 0.
    t5_ids = t5_tok.encode(PROMPT).ids
    t5_ids = (t5_ids[:-1][: MAX_SEQ - 1] + [1]) + [0] * max(0, MAX_SEQ - len(t5_ids))
    # CLIP: <|startoftext|> ... <|endoftext|>, truncate to 77 keeping the eos, pad with 49407.
    c = clip_tok.encode(PROMPT).ids
    c = c[:-1][:76] + [49407]
    clip_ids = c + [49407] * (77 - len(c))

    t5 = T5EncoderModel(T5Config(**T5_CFG)).eval()
    sd = {k: v.float() for k, v in load_file(os.path.join(single_dir, "t5xxl.safetensors")).items()}
    sd["encoder.embed_tokens.weight"] = sd["shared.weight"]
    t5.load_state_dict(sd, strict=True)
    clip = CLIPTextModel(CLIPTextConfig(**CLIP_CFG)).eval()
    clip.load_state_dict({k.removeprefix("text_model."): v.float()
                          for k, v in load_file(os.path.join(single_dir, "clip_l.safetensors")).items()}, strict=True)
    txt = t5(torch.tensor([t5_ids]))[0]
    hs = clip(torch.tensor([clip_ids])).last_hidden_state
    first_eos = clip_ids.index(49407)
    y = hs[:, first_eos]

    w = load_bfl(os.path.join(single_dir, f"flux_{kind}_bfl.safetensors"))
    lh, lw = 2 * (HEIGHT // 16), 2 * (WIDTH // 16)
    noise = torch.randn([1, 16, lh, lw], generator=torch.Generator("cpu").manual_seed(SEED))
    x = noise.view(1, 16, lh // 2, 2, lw // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(1, (lh // 2) * (lw // 2), 64)
    img_ids = torch.zeros(lh // 2, lw // 2, 3)
    img_ids[..., 1] = torch.arange(lh // 2)[:, None]
    img_ids[..., 2] = torch.arange(lw // 2)[None, :]
    img_ids = img_ids.reshape(-1, 3)
    txt_ids = torch.zeros(MAX_SEQ, 3)

    sig = np.linspace(1.0, 1.0 / STEPS, STEPS).astype(np.float32)
    if SCHEDULER_CONFIGS[kind]["use_dynamic_shifting"]:
        n = x.shape[1]
        m = (1.15 - 0.5) / (4096 - 256)
        mu = n * m + (0.5 - m * 256)
        sig = math.exp(mu) / (math.exp(mu) + (1.0 / sig - 1.0))
    sig = torch.tensor(np.append(sig, 0.0), dtype=torch.float32)
    guidance = torch.tensor([GUIDANCE[kind]]) if kind == "dev" else None
    for i in range(STEPS):
        t = (sig[i] * 1000).expand(1) / 1000  # the pipeline's timestep round trip
        v = flux_forward(w, x, txt, y, t, img_ids, txt_ids, guidance=guidance,
                         axes_dim=FLUX_CFG[kind]["axes_dims_rope"])
        x = x + (sig[i + 1] - sig[i]) * v
    final = x
    z = x.view(1, lh // 2, lw // 2, 16, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(1, 16, lh, lw)
    z = z / VAE_CFG["scaling_factor"] + VAE_CFG["shift_factor"]
    vae_sd = convert_ldm_vae_checkpoint(load_file(os.path.join(single_dir, "ae.safetensors")), VAE_CFG)
    vae = AutoencoderKL(**VAE_CFG).eval()
    vae.load_state_dict(vae_sd, strict=True)
    img = vae.decode(z).sample
    img = (img * 0.5 + 0.5).clamp(0, 1)[0].permute(1, 2, 0)
    return torch.tensor([t5_ids]), torch.tensor([clip_ids]), txt, y, final, img


# ---------------------------------------------------------------- main
def main():
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}")
    for sub in ("schnell", "dev", "single"):  # README.md is hand-written: kept
        if os.path.isdir(os.path.join(OUT, sub)):
            shutil.rmtree(os.path.join(OUT, sub))
    single = os.path.join(OUT, "single")
    os.makedirs(single)

    t5_tok, clip_tok = load_tokenizers()
    t5, clip, vae, flux = build_components()

    # single files, written once (text encoders and VAE are shared by both pipelines)
    t5_sd = {k: v for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"}
    save_file(as_dtype(t5_sd, STORE_DTYPES["t5xxl"]), os.path.join(single, "t5xxl.safetensors"))
    # transformers 5 writes CLIPTextModel keys without the "text_model." prefix (diffusers/text_encoder
    # here); ComfyUI's clip_l.safetensors and every transformers-4 file on the Hub have it.
    clip_sd = {"text_model." + k: v for k, v in clip.state_dict().items()}
    assert all(k.startswith(("text_model.embeddings.", "text_model.encoder.", "text_model.final_layer_norm."))
               for k in clip_sd), sorted(clip_sd)
    save_file(as_dtype(clip_sd, STORE_DTYPES["clip_l"]), os.path.join(single, "clip_l.safetensors"))
    vae_sd = {k: v.detach().clone() for k, v in vae.state_dict().items()}
    ae = vae_diffusers_to_ldm(vae_sd, len(VAE_CFG["block_out_channels"]), VAE_CFG["layers_per_block"])
    save_file(as_dtype(ae, STORE_DTYPES["ae"]), os.path.join(single, "ae.safetensors"))

    # check: diffusers' own LDM converter maps ae.safetensors back exactly; from_single_file loads it
    back = convert_ldm_vae_checkpoint(load_file(os.path.join(single, "ae.safetensors")), VAE_CFG)
    assert set(back) == set(vae_sd), set(back) ^ set(vae_sd)
    for k in vae_sd:
        assert torch.equal(back[k], vae_sd[k]), k

    for kind in ("schnell", "dev"):
        kdir = os.path.join(OUT, kind)
        cfg = FLUX_CFG[kind]
        tf = flux[kind]
        pipe = make_pipe(kind, t5, clip, vae, tf, t5_tok, clip_tok)
        ddir = os.path.join(kdir, "diffusers")
        pipe.save_pretrained(ddir, safe_serialization=True)
        for comp in ("text_encoder", "text_encoder_2", "transformer", "vae"):
            recast_folder(os.path.join(ddir, comp), STORE_DTYPES["diffusers/" + comp])
        # The tokenizer files (6 MB a folder) are not kept: they are the shared tokenizer data
        # (TOK_DIR) byte for byte; model_index.json still names the tokenizer classes.
        for comp in ("tokenizer", "tokenizer_2"):
            shutil.rmtree(os.path.join(ddir, comp))

        bfl = diffusers_to_bfl({k: v.detach().clone() for k, v in tf.state_dict().items()},
                               cfg["num_layers"], cfg["num_single_layers"])
        bfl_path = os.path.join(single, f"flux_{kind}_bfl.safetensors")
        save_file(as_dtype(bfl, STORE_DTYPES["flux_bfl"]), bfl_path)
        convert = diffusers_single_file_converter(cfg["num_attention_heads"] * cfg["attention_head_dim"])
        tback = {k: v.float() for k, v in convert(dict(load_file(bfl_path))).items()}
        tsd = tf.state_dict()
        assert set(tback) == set(tsd) and all(torch.equal(tback[k], tsd[k]) for k in tsd), kind

        # --- the run
        cap = {}
        image = run_pipe(pipe, kind, "np", capture=cap)[0]  # [H, W, 3] float32 in [0, 1]
        latent_out = run_pipe(pipe, kind, "latent")  # packed [1, 15, 64]
        image = torch.from_numpy(np.ascontiguousarray(image))
        assert torch.equal(latent_out, cap["latents_steps"][-1])

        lh, lw = 2 * (HEIGHT // 16), 2 * (WIDTH // 16)
        noise = torch.randn([1, 16, lh, lw], generator=torch.Generator("cpu").manual_seed(SEED), dtype=torch.float32)
        noise_packed = FluxPipeline._pack_latents(noise, 1, 16, lh, lw)
        assert torch.equal(noise_packed, cap["noise_packed"]), "pipeline noise differs from torch.randn + pack"

        t5_ids, clip_ids, t5_out, clip_pooled, clip_last = encode_text(pipe, PROMPT)
        assert torch.equal(t5_out, cap["t5_out_in"]) and torch.equal(clip_pooled, cap["pooled_in"])
        t5_ids_l, clip_ids_l, t5_out_l, clip_pooled_l, _ = encode_text(pipe, LONG_PROMPT)
        clip_untrunc = pipe.tokenizer(LONG_PROMPT).input_ids
        t5_untrunc = pipe.tokenizer_2(LONG_PROMPT).input_ids
        assert len(clip_untrunc) > 77 and len(t5_untrunc) > MAX_SEQ

        final_packed = latent_out
        final_unpacked = FluxPipeline._unpack_latents(final_packed, HEIGHT, WIDTH, pipe.vae_scale_factor)
        decode_in = final_unpacked / VAE_CFG["scaling_factor"] + VAE_CFG["shift_factor"]
        with torch.no_grad():
            decode_out = vae.decode(decode_in).sample  # [1, 3, 48, 80], raw (about [-1, 1])
            assert torch.equal(decode_in, cap["decoder_in"])
            img_chk = (decode_out * 0.5 + 0.5).clamp(0, 1)[0].permute(1, 2, 0)
            assert torch.equal(img_chk, image), "postprocess differs"
            enc_in = (image.permute(2, 0, 1)[None] * 2 - 1).contiguous()  # the image, in [-1, 1]
            post = vae.encode(enc_in).latent_dist
            mean, logvar = post.mean, post.logvar
            scaled = (mean - VAE_CFG["shift_factor"]) * VAE_CFG["scaling_factor"]
        image_u8 = (image.numpy() * 255).round().astype(np.uint8)
        Image.fromarray(image_u8).save(os.path.join(kdir, "diffusers.png"), optimize=False)

        golden = {
            "t5_ids": t5_ids, "clip_ids": clip_ids, "t5_out": t5_out, "clip_pooled": clip_pooled,
            "clip_last_hidden": clip_last,
            "t5_ids_long": t5_ids_l, "clip_ids_long": clip_ids_l, "t5_out_long": t5_out_l,
            "clip_pooled_long": clip_pooled_l,
            "clip_ids_long_untruncated": torch.tensor([clip_untrunc]),
            "t5_ids_long_untruncated": torch.tensor([t5_untrunc]),
            "noise": noise, "noise_packed": noise_packed,
            "img_ids": cap["img_ids"], "txt_ids": cap["txt_ids"],
            "sigmas": cap["sigmas"], "timesteps": cap["timesteps"],
            "timesteps_in": torch.cat(cap["t_in"]),
            "velocities": torch.cat(cap["velocities"]),  # [3, 15, 64]
            "latents_steps": torch.cat(cap["latents_steps"]),  # [3, 15, 64] after each step
            "final_latents_packed": final_packed, "final_latents": final_unpacked,
            "vae_decode_input": decode_in, "vae_decode_output": decode_out,
            "image": image, "image_u8": torch.from_numpy(image_u8.astype(np.float32)),
            "vae_encode_input": enc_in, "vae_latent_mean": mean, "vae_latent_logvar": logvar,
            "vae_latent_scaled": scaled,
        }
        if kind == "dev":
            golden["guidance"] = cap["guidance_in"]
        save_file(f32(golden), os.path.join(kdir, "golden.safetensors"),
                  # one key: safetensors writes a multi-key metadata map in random order
                  metadata={"settings": json.dumps({
                      "prompt": PROMPT, "long_prompt": LONG_PROMPT, "seed": SEED, "steps": STEPS,
                      "width": WIDTH, "height": HEIGHT, "max_sequence_length": MAX_SEQ,
                      "guidance_scale": GUIDANCE[kind]}, sort_keys=True)})

        # --- checks: reload the diffusers folder; the from-scratch single-file pipeline
        re_pipe = FluxPipeline.from_pretrained(ddir, dtype=torch.float32, tokenizer=clip_tok, tokenizer_2=t5_tok)
        for comp in ("text_encoder", "text_encoder_2", "transformer", "vae"):
            a, b = getattr(re_pipe, comp).state_dict(), getattr(pipe, comp).state_dict()
            assert all(torch.equal(a[k], b[k]) for k in b), comp
        re_img = torch.from_numpy(run_pipe(re_pipe, kind, "np")[0])
        assert torch.equal(re_img, image), (kind, (re_img - image).abs().max())
        s_t5ids, s_clipids, s_t5, s_y, s_final, s_img = from_scratch(kind, single)
        assert torch.equal(s_t5ids, t5_ids) and torch.equal(s_clipids, clip_ids)
        e = {
            "t5_out": rel_err(s_t5, t5_out), "clip_pooled": rel_err(s_y, clip_pooled),
            "final_latents": rel_err(s_final, final_packed),
            "image_abs": (s_img - image).abs().max().item(),
        }
        assert e["t5_out"] == 0 and e["clip_pooled"] == 0, e
        assert e["final_latents"] < 1e-4 and e["image_abs"] < 1e-4, e
        sat = ((image_u8 == 0) | (image_u8 == 255)).mean()
        print(
            f"pipeline/{kind}: image {tuple(image.shape)} mean={image.mean():.3f} std={image.std():.3f} "
            f"saturated={sat:.1%} u8 range {image_u8.min()}..{image_u8.max()}, distinct u8 {len(np.unique(image_u8))}; "
            f"sigmas={[round(s, 6) for s in cap['sigmas'].tolist()]}; |v| std={torch.cat(cap['velocities']).std():.3f}; "
            f"vae mean std={mean.std():.3f}; reload exact; from-scratch rel errs {e}"
        )
        print(f"  t5_ids={t5_ids.tolist()}\n  clip_ids[:12]={clip_ids[0, :12].tolist()}")

    # from_single_file (diffusers' public path) with the saved folder's config
    v2 = AutoencoderKL.from_single_file(os.path.join(single, "ae.safetensors"),
                                        config=os.path.join(OUT, "dev", "diffusers"), subfolder="vae")
    sd2 = v2.state_dict()
    assert all(torch.equal(sd2[k], vae_sd[k]) for k in vae_sd)
    print("ae.safetensors: convert_ldm_vae_checkpoint round trip and from_single_file exact")

    # transformers 5 still loads the prefixed (Hub / ComfyUI) CLIP layout of clip_l.safetensors
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(os.path.join(OUT, "dev", "diffusers", "text_encoder", "config.json"), tmp)
        shutil.copy(os.path.join(single, "clip_l.safetensors"), os.path.join(tmp, "model.safetensors"))
        c2 = CLIPTextModel.from_pretrained(tmp, dtype=torch.float32).state_dict()
    assert set(c2) == set(clip.state_dict()) and all(torch.equal(c2[k], v) for k, v in clip.state_dict().items())
    print("clip_l.safetensors (text_model.* keys): CLIPTextModel.from_pretrained loads it exactly")


if __name__ == "__main__":
    main()
