"""Writes the small golden fixtures under tests/fixtures/ from torch + diffusers.

Run by hand (never by CI), from the repository root, with the reference venv
(see tests/reference/README.md for how to make it):

    nice -n 10 /work/venv-ref/bin/python tests/reference/make_goldens.py

It is deterministic (fixed seeds; CPU float32) and rewrites:

  tests/fixtures/flux/{schnell,dev}/
      diffusers/model_index.json                   (transformer + scheduler only)
      diffusers/transformer/config.json            FluxTransformer2DModel.save_pretrained
      diffusers/transformer/diffusion_pytorch_model.safetensors
      diffusers/scheduler/scheduler_config.json    copy of the real FLUX.1-{schnell,dev} file
      diffusers_sharded/transformer/config.json    same weights, save_pretrained(max_shard_size=...)
      diffusers_sharded/transformer/diffusion_pytorch_model-0000i-of-0000n.safetensors
      diffusers_sharded/transformer/diffusion_pytorch_model.safetensors.index.json
      bfl.safetensors      same weights, Black Forest Labs key layout (see flux_convert.py)
      comfy.safetensors    bfl.safetensors with every key prefixed "model.diffusion_model."
      golden.safetensors   img [2,15,16], txt [2,7,32], y [2,24], timesteps [2],
                           guidance [2] (dev only), img_ids [15,3], txt_ids [7,3],
                           out [2,15,16] = diffusers transformer output
  tests/fixtures/noise/golden.safetensors
      s{seed}_{d0}x{d1}x... = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))
  tests/fixtures/sampler/schedules.json
      FlowMatchEulerDiscreteScheduler sigmas/timesteps exactly as FluxPipeline sets them.

Checks made on the way (the script fails if one does not hold):
  * the pure-torch BFL-layout forward in flux_bfl_reference.py, run on bfl.safetensors
    and comfy.safetensors, reproduces the diffusers output (max abs err <= 1e-4; printed);
  * diffusers' own single-file converter (convert_flux_transformer_checkpoint_to_diffusers,
    with its hard-coded inner_dim patched to the tiny size) maps bfl.safetensors and
    comfy.safetensors back to exactly the diffusers state dict;
  * the sharded folder loads back with from_pretrained and gives the same output.

All tensors are stored float32 and contiguous.
"""

import inspect
import json
import os
import shutil
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import diffusers  # noqa: E402
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel  # noqa: E402
from diffusers.pipelines.flux.pipeline_flux import calculate_shift  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from flux_bfl_reference import flux_forward, load_bfl  # noqa: E402
from flux_convert import diffusers_to_bfl  # noqa: E402

ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")

# The real black-forest-labs/FLUX.1-{dev,schnell} scheduler/scheduler_config.json.
SCHEDULER_CONFIGS = {
    "dev": {
        "_class_name": "FlowMatchEulerDiscreteScheduler",
        "_diffusers_version": "0.30.0.dev0",
        "base_image_seq_len": 256,
        "base_shift": 0.5,
        "max_image_seq_len": 4096,
        "max_shift": 1.15,
        "num_train_timesteps": 1000,
        "shift": 3.0,
        "use_dynamic_shifting": True,
    },
    "schnell": {
        "_class_name": "FlowMatchEulerDiscreteScheduler",
        "_diffusers_version": "0.29.0.dev0",
        "base_image_seq_len": 256,
        "base_shift": 0.5,
        "max_image_seq_len": 4096,
        "max_shift": 1.15,
        "num_train_timesteps": 1000,
        "shift": 1.0,
        "use_dynamic_shifting": False,
    },
}

MODELS = {
    "schnell": dict(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=24,
        guidance_embeds=False, axes_dims_rope=(4, 6, 6),
    ),
    "dev": dict(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=3, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=24,
        guidance_embeds=True, axes_dims_rope=(2, 2, 4),
    ),
}
MODEL_SEEDS = {"schnell": 1234, "dev": 5678}

BATCH = 2
LATENT_H, LATENT_W = 6, 10  # before 2x2 packing -> 3 x 5 = 15 image tokens
TXT_LEN = 7


def contiguous_f32(d):
    return {k: v.detach().to(torch.float32).contiguous().clone() for k, v in d.items()}


def write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def build_model(name):
    torch.manual_seed(MODEL_SEEDS[name])
    model = FluxTransformer2DModel(**MODELS[name])
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model.eval()  # parameters are float32 already (default dtype)


def make_inputs(name):
    g = torch.Generator("cpu").manual_seed(MODEL_SEEDS[name] + 1)
    cfg = MODELS[name]
    n_img = (LATENT_H // 2) * (LATENT_W // 2)
    inputs = {
        "img": torch.randn(BATCH, n_img, cfg["in_channels"], generator=g),
        "txt": torch.randn(BATCH, TXT_LEN, cfg["joint_attention_dim"], generator=g),
        "y": torch.randn(BATCH, cfg["pooled_projection_dim"], generator=g),
        "timesteps": torch.tensor([0.7, 0.3]),
        # Exactly what FluxPipeline builds: _prepare_latent_image_ids(B, H//2, W//2, ...) -> [h*w, 3]
        "img_ids": FluxPipeline._prepare_latent_image_ids(BATCH, LATENT_H // 2, LATENT_W // 2, "cpu", torch.float32),
        "txt_ids": torch.zeros(TXT_LEN, 3),
    }
    if cfg["guidance_embeds"]:
        inputs["guidance"] = torch.tensor([3.5, 2.0])
    return inputs


def run_diffusers(model, inp):
    with torch.no_grad():
        return model(
            hidden_states=inp["img"],
            encoder_hidden_states=inp["txt"],
            pooled_projections=inp["y"],
            timestep=inp["timesteps"],
            img_ids=inp["img_ids"],
            txt_ids=inp["txt_ids"],
            guidance=inp.get("guidance"),
            return_dict=False,
        )[0]


def diffusers_single_file_converter(inner_dim):
    """diffusers' convert_flux_transformer_checkpoint_to_diffusers hard-codes inner_dim = 3072
    (real FLUX). Re-create it with the tiny model's inner_dim so it can check our BFL file."""
    from diffusers.loaders import single_file_utils as sfu

    src = inspect.getsource(sfu.convert_flux_transformer_checkpoint_to_diffusers)
    assert "inner_dim = 3072" in src, "diffusers converter changed; update the patch"
    src = src.replace("inner_dim = 3072", f"inner_dim = {inner_dim}")
    ns = dict(vars(sfu))
    exec(compile(src, "<patched convert_flux>", "exec"), ns)
    return ns["convert_flux_transformer_checkpoint_to_diffusers"]


def save_shard_count(model, path, n_min=3):
    total = sum(p.numel() * 4 for p in model.parameters())
    size = total // (n_min + 1)
    model.save_pretrained(path, safe_serialization=True, max_shard_size=size)
    shards = sorted(f for f in os.listdir(path) if f.startswith("diffusion_pytorch_model-"))
    assert len(shards) >= n_min, shards
    return shards


def make_flux(name):
    cfg = MODELS[name]
    out_dir = os.path.join(FIXTURES, "flux", name)
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    os.makedirs(out_dir)

    model = build_model(name)
    inp = make_inputs(name)
    out = run_diffusers(model, inp)

    # diffusers folder (single file) + scheduler + model_index
    dd = os.path.join(out_dir, "diffusers")
    model.save_pretrained(os.path.join(dd, "transformer"), safe_serialization=True)
    write_json(os.path.join(dd, "scheduler", "scheduler_config.json"), SCHEDULER_CONFIGS[name])
    write_json(os.path.join(dd, "model_index.json"), {
        "_class_name": "FluxPipeline",
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "transformer": ["diffusers", "FluxTransformer2DModel"],
    })

    # sharded diffusers folder
    shards = save_shard_count(model, os.path.join(out_dir, "diffusers_sharded", "transformer"))

    # BFL + Comfy layouts
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    bfl = diffusers_to_bfl(sd, cfg["num_layers"], cfg["num_single_layers"])
    save_file(bfl, os.path.join(out_dir, "bfl.safetensors"))
    save_file({"model.diffusion_model." + k: v for k, v in bfl.items()}, os.path.join(out_dir, "comfy.safetensors"))

    # golden inputs/outputs
    golden = dict(inp)
    golden["out"] = out
    save_file(contiguous_f32(golden), os.path.join(out_dir, "golden.safetensors"))

    # ---- checks
    inner = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    convert = diffusers_single_file_converter(inner)
    for fname in ("bfl.safetensors", "comfy.safetensors"):
        back = convert(dict(load_file(os.path.join(out_dir, fname))))
        assert set(back) == set(sd), (set(back) ^ set(sd))
        for k in sd:
            assert torch.equal(back[k], sd[k]), f"{fname}: {k} differs after diffusers' own conversion"

    errs = {}
    for fname in ("bfl.safetensors", "comfy.safetensors"):
        w = load_bfl(os.path.join(out_dir, fname))
        ref = flux_forward(
            w, inp["img"], inp["txt"], inp["y"], inp["timesteps"], inp["img_ids"], inp["txt_ids"],
            guidance=inp.get("guidance"), axes_dim=cfg["axes_dims_rope"],
        )
        errs[fname] = (ref - out).abs().max().item()
        assert errs[fname] <= 1e-4, (name, fname, errs[fname])

    reloaded = FluxTransformer2DModel.from_pretrained(os.path.join(out_dir, "diffusers_sharded", "transformer"))
    re_err = (run_diffusers(reloaded.eval(), inp) - out).abs().max().item()
    assert re_err == 0.0, re_err

    print(
        f"flux/{name}: out {tuple(out.shape)}, max|out|={out.abs().max().item():.4f}, std={out.std().item():.4f}; "
        f"BFL reference max abs err: bfl={errs['bfl.safetensors']:.3e} comfy={errs['comfy.safetensors']:.3e}; "
        f"{len(shards)} shards; diffusers single-file converter round trip exact"
    )


NOISE_SEEDS = [0, 1, 42, 2024, 4294967297, 9007199254740993]
NOISE_SHAPES = [[1], [5], [15], [16], [17], [3, 7], [2, 3, 5], [1, 16, 12, 20]]
BIG_SHAPE, BIG_SEEDS = [1, 16, 128, 128], [0, 42]


def noise_key(seed, shape):
    return f"s{seed}_" + "x".join(str(d) for d in shape)


def make_noise():
    out = {}
    for seed in NOISE_SEEDS:
        shapes = NOISE_SHAPES + ([BIG_SHAPE] if seed in BIG_SEEDS else [])
        for shape in shapes:
            gen = torch.Generator("cpu").manual_seed(seed)
            out[noise_key(seed, shape)] = torch.randn(shape, generator=gen, dtype=torch.float32)
    path = os.path.join(FIXTURES, "noise", "golden.safetensors")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file(contiguous_f32(out), path)
    print(f"noise: {len(out)} tensors, e.g. s42_1x16x12x20[0,0,0,:4] = {out['s42_1x16x12x20'][0, 0, 0, :4].tolist()}")


SCHEDULE_CASES = [("schnell", s, 4096) for s in (1, 4)] + [
    ("dev", s, L) for s in (1, 3, 28, 50) for L in (15, 256, 1024, 4096, 6000)
]


def make_schedules():
    cases = []
    for kind, steps, L in SCHEDULE_CASES:
        conf = SCHEDULER_CONFIGS[kind]
        sched = FlowMatchEulerDiscreteScheduler.from_config(conf)
        # exactly FluxPipeline.__call__ (step 5):
        sigmas = np.linspace(1.0, 1 / steps, steps)
        mu = calculate_shift(
            L,
            sched.config.get("base_image_seq_len", 256),
            sched.config.get("max_image_seq_len", 4096),
            sched.config.get("base_shift", 0.5),
            sched.config.get("max_shift", 1.15),
        )
        # retrieve_timesteps(scheduler, steps, device, sigmas=sigmas, mu=mu) does:
        sched.set_timesteps(sigmas=sigmas, mu=mu)
        cases.append({
            "kind": kind,
            "steps": steps,
            "image_seq_len": L,
            # the pipeline always computes and passes mu, but the scheduler ignores it unless
            # use_dynamic_shifting (dev); recorded as null where it has no effect (schnell)
            "mu": mu if conf["use_dynamic_shifting"] else None,
            "sigmas": [float(x) for x in sched.sigmas.tolist()],
            "timesteps": [float(x) for x in sched.timesteps.tolist()],
        })
    path = os.path.join(FIXTURES, "sampler", "schedules.json")
    write_json(path, cases)
    ex = next(c for c in cases if c["kind"] == "dev" and c["steps"] == 28 and c["image_seq_len"] == 4096)
    print(f"schedules: {len(cases)} cases; dev 28 steps @ L=4096: mu={ex['mu']}, sigmas[:3]={ex['sigmas'][:3]}")


def main():
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, numpy {np.__version__}")
    for name in MODELS:
        make_flux(name)
    make_noise()
    make_schedules()


if __name__ == "__main__":
    main()
