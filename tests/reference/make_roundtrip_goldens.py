"""Round-trip goldens: LoRA files written by `atelier train`, generated with in diffusers.

Reads tests/fixtures/train/roundtrip/{peft,kohya}.safetensors, written by (each --format):

    atelier train --model tests/fixtures/pipeline/dev/diffusers \
        --images tests/fixtures/train/learn/images --trigger zqx --out <file> --format <fmt> \
        --steps 30 --rank 4 --alpha 8 --lr 1e-2 --resolution 32 --max-sequence-length 32 \
        --caption-dropout 0 --device cpu

and writes tests/fixtures/train/roundtrip/{peft,kohya}.png: the tiny dev pipeline's image of
make_lora_goldens' settings (prompt "zqx stripes", 80x48, 3 steps, seed 42, guidance 3.5, T5
length 32) with the LoRA at weight 1.0:
  peft   through diffusers' own `load_lora_weights` (no alpha in the file: scale 1, the trained
         alpha/r folded into B by atelier)
  kohya  through an explicit merge W += (alpha/r) B A onto the diffusers modules, the fused BFL
         rows split onto to_q/to_k/to_v/proj_mlp (diffusers' kohya converter hard-codes FLUX.1's
         sizes and cannot load a LoRA for the tiny model)
and checks that both ways give the same image (they are the same training run).

    ATELIER_TOKENIZERS=weights/tokenizers /root/.cache/ref-venv/bin/python tests/reference/make_roundtrip_goldens.py
"""
import os
import sys

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import make_lora_goldens as lg  # noqa: E402

DIR = os.path.join(lg.ROOT, "tests", "fixtures", "train", "roundtrip")
PROMPT = "zqx stripes"


@torch.no_grad()
def run(pipe):
    img = pipe(
        PROMPT, height=lg.HEIGHT, width=lg.WIDTH, num_inference_steps=lg.STEPS, guidance_scale=lg.GUIDANCE["dev"],
        max_sequence_length=lg.MAX_SEQ, generator=torch.Generator("cpu").manual_seed(lg.SEED), output_type="np",
    ).images[0]
    return (img * 255).round().astype(np.uint8)


@torch.no_grad()
def merge_kohya(pipe, path):
    sd = load_file(path)
    cfg = pipe.transformer.config
    h = cfg.num_attention_heads * cfg.attention_head_dim
    modules = dict(pipe.transformer.named_modules())
    n = 0
    for key in sd:
        if not key.endswith(".lora_down.weight"):
            continue
        base = key[: -len(".lora_down.weight")]
        down, up = sd[key].float(), sd[base + ".lora_up.weight"].float()
        scale = sd[base + ".alpha"].item() / down.shape[0]
        flat = base[len("lora_unet_"):]
        path = next(p for p in lg.bfl_linears(dict(cfg))[0]
                    if p.replace(".", "_") == flat)
        delta = scale * (up @ down)
        for module, rows, swap in lg.to_diffusers(path, h):
            d = delta[rows]
            if swap:
                d = torch.cat([d[d.shape[0] // 2:], d[: d.shape[0] // 2]])
            modules[module].weight += d
        n += 1
    return n


def main():
    out = {}
    pipe = lg.load_pipe("dev")
    pipe.load_lora_weights(os.path.join(DIR, "peft.safetensors"))
    out["peft"] = run(pipe)
    pipe = lg.load_pipe("dev")
    n = merge_kohya(pipe, os.path.join(DIR, "kohya.safetensors"))
    out["kohya"] = run(pipe)
    base = run(lg.load_pipe("dev"))
    for name, img in out.items():
        Image.fromarray(img).save(os.path.join(DIR, f"{name}.png"))
    diff = np.abs(out["peft"].astype(int) - out["kohya"].astype(int)).max()
    moved = np.abs(out["peft"].astype(int) - base.astype(int)).max()
    print(f"kohya: {n} modules merged; peft vs kohya max diff {diff}/255; LoRA vs base max diff {moved}/255")
    assert diff <= 1, diff
    assert moved > 2, "the LoRA must change the image for the test to mean something"


if __name__ == "__main__":
    main()
