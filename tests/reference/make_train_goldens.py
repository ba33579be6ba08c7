"""Training goldens: the flow-matching loss, the LoRA gradients and two AdamW steps in torch,
for the tiny random FLUX fixtures (schnell- and dev-like) of make_goldens.py.

Rewrites tests/fixtures/train/{schnell,dev}.safetensors, each holding
  x0, noise [2, 15, 16]        packed clean latents (make_goldens' `img`) and the noise
  sigmas [2]                   0.35 and 0.8
  txt, y, txt_ids, img_ids     the conditioning of tests/fixtures/flux/<kind>/golden.safetensors
  guidance [2]                 dev only: 1.0, as trainers use for FLUX.1-dev
  {path}.lora_down.weight      A [r, in] (rank 4) on every Linear of the double and single blocks
  {path}.lora_up.weight        B [out, r], random and non-zero so that A has a gradient
  loss [1]                     mean((v(x_t) - (noise - x0))^2), x_t = (1 - s) x0 + s noise
  grad.{path}.down / .up       dloss/dA, dloss/dB
  adamw1.{path}.down / .up     A, B after one torch.optim.AdamW step (lr 1e-2, torch defaults:
                               betas 0.9/0.999, eps 1e-8, weight decay 1e-2) preceded by
                               clip_grad_norm_(1.0) on these grads
  adamw2.{path}.down / .up     after a second step with the grads times -0.5
and metadata rank, alpha (8: scale alpha/r = 2), grad_norm.

The model is the pure-torch BFL reference (flux_bfl_reference.py) with the LoRA as a side path
on its `linear`: y = x W^T + b + (alpha/r) (x A^T) B^T, which is what PEFT's LoRA Linear computes
(peft wraps nn.Linear modules; the BFL reference is flat functions, so the side path is written
out here). Deterministic; ~2 s.

    /root/.cache/ref-venv/bin/python tests/reference/make_train_goldens.py
"""
import json
import os
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, HERE)
import flux_bfl_reference as ref  # noqa: E402

OUT = os.path.join(ROOT, "tests", "fixtures", "train")
RANK = 4
ALPHA = 8.0
SIGMAS = [0.35, 0.8]
LR = 1e-2

torch.set_num_threads(2)


def block_linears(w):
    """Every Linear of the double and single blocks, BFL paths, sorted."""
    paths = sorted(k[: -len(".weight")] for k in w if k.endswith(".weight") and w[k].dim() == 2)
    return [p for p in paths if p.startswith("double_blocks.") or p.startswith("single_blocks.")]


def make(kind):
    w = ref.load_bfl(os.path.join(ROOT, "tests", "fixtures", "flux", kind, "bfl.safetensors"))
    g = load_file(os.path.join(ROOT, "tests", "fixtures", "flux", kind, "golden.safetensors"))
    cfg = os.path.join(ROOT, "tests", "fixtures", "flux", kind, "diffusers", "transformer", "config.json")
    axes = tuple(json.load(open(cfg))["axes_dims_rope"])
    gen = torch.Generator().manual_seed(7 if kind == "schnell" else 8)
    x0 = g["img"]
    noise = torch.randn(x0.shape, generator=gen)
    sigmas = torch.tensor(SIGMAS)
    guidance = torch.ones(2) if "guidance_in.in_layer.weight" in w else None

    lora = {}
    for p in block_linears(w):
        out_f, in_f = w[p + ".weight"].shape
        bound = 1.0 / in_f**0.5  # kaiming_uniform(a=sqrt(5)), as peft and kohya initialize A
        a = (torch.rand((RANK, in_f), generator=gen) * 2 - 1) * bound
        b = torch.randn((out_f, RANK), generator=gen) * 0.05
        lora[p] = (a.requires_grad_(), b.requires_grad_())
    scale = ALPHA / RANK

    base_linear = ref.linear

    def linear_with_lora(wd, name, x):
        y = base_linear(wd, name, x)
        if name in lora:
            a, b = lora[name]
            y = y + scale * ((x @ a.T) @ b.T)
        return y

    ref.linear = linear_with_lora
    try:
        xt = (1 - sigmas[:, None, None]) * x0 + sigmas[:, None, None] * noise
        pred = ref.flux_forward(w, xt, g["txt"], g["y"], sigmas, g["img_ids"], g["txt_ids"],
                                guidance=guidance, axes_dim=axes)
        loss = F.mse_loss(pred, noise - x0)
        loss.backward()
    finally:
        ref.linear = base_linear

    out = {"x0": x0, "noise": noise, "sigmas": sigmas, "txt": g["txt"], "y": g["y"],
           "txt_ids": g["txt_ids"], "img_ids": g["img_ids"], "loss": loss.detach().reshape(1)}
    if guidance is not None:
        out["guidance"] = guidance
    params = []
    for p, (a, b) in lora.items():
        out[f"{p}.lora_down.weight"] = a.detach().clone()
        out[f"{p}.lora_up.weight"] = b.detach().clone()
        out[f"grad.{p}.down"] = a.grad.clone()
        out[f"grad.{p}.up"] = b.grad.clone()
        params += [a, b]

    opt = torch.optim.AdamW(params, lr=LR)
    grads = [q.grad.clone() for q in params]
    norm = torch.nn.utils.clip_grad_norm_(params, 1.0).item()
    opt.step()
    for p, (a, b) in lora.items():
        out[f"adamw1.{p}.down"] = a.detach().clone()
        out[f"adamw1.{p}.up"] = b.detach().clone()
    for q, gr in zip(params, grads):
        q.grad = gr * -0.5
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    for p, (a, b) in lora.items():
        out[f"adamw2.{p}.down"] = a.detach().clone()
        out[f"adamw2.{p}.up"] = b.detach().clone()

    os.makedirs(OUT, exist_ok=True)
    meta = {"rank": str(RANK), "alpha": str(ALPHA), "grad_norm": repr(norm), "lr": repr(LR)}
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(OUT, f"{kind}.safetensors"), metadata=meta)
    print(f"{kind}: loss {loss.item():.6f}, grad norm {norm:.4f}, {len(lora)} LoRA modules")


if __name__ == "__main__":
    for kind in ("schnell", "dev"):
        make(kind)
