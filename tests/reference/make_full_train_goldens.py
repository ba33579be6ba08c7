"""Full-training goldens: the flow-matching loss, the gradient of every transformer weight and
one AdamW step over all of them in torch, for the tiny random FLUX fixtures (schnell- and
dev-like), on the batch of make_train_goldens.py (x0, noise, sigmas and conditioning are read
from tests/fixtures/train/<kind>.safetensors, so run that one first when it changes).

Writes tests/fixtures/train/<kind>_full.safetensors with
  loss [1]                 mean((v(x_t) - (noise - x0))^2) of the base model (no LoRA)
  grad.<bfl name>          dloss/dW of every tensor of the checkpoint, PyTorch layout
  adamw1.<bfl name>        every tensor after one torch.optim.AdamW step (lr 1e-3, torch's
                           defaults otherwise) preceded by clip_grad_norm_(1.0) over all of them
and metadata grad_norm, lr. The model is the pure-torch BFL reference (flux_bfl_reference.py).
Deterministic; ~2 s.

    /root/.cache/ref-venv/bin/python tests/reference/make_full_train_goldens.py
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
LR = 1e-3

torch.set_num_threads(2)


def make(kind):
    w = ref.load_bfl(os.path.join(ROOT, "tests", "fixtures", "flux", kind, "bfl.safetensors"))
    b = load_file(os.path.join(OUT, f"{kind}.safetensors"))
    cfg = os.path.join(ROOT, "tests", "fixtures", "flux", kind, "diffusers", "transformer", "config.json")
    axes = tuple(json.load(open(cfg))["axes_dims_rope"])
    names = sorted(w)
    for n in names:
        w[n] = w[n].clone().requires_grad_()
    x0, noise, sigmas = b["x0"], b["noise"], b["sigmas"]
    xt = (1 - sigmas[:, None, None]) * x0 + sigmas[:, None, None] * noise
    pred = ref.flux_forward(w, xt, b["txt"], b["y"], sigmas, b["img_ids"], b["txt_ids"],
                            guidance=b.get("guidance"), axes_dim=axes)
    loss = F.mse_loss(pred, noise - x0)
    loss.backward()
    out = {"loss": loss.detach().reshape(1)}
    for n in names:
        out[f"grad.{n}"] = w[n].grad.clone()
    params = [w[n] for n in names]
    opt = torch.optim.AdamW(params, lr=LR)
    norm = torch.nn.utils.clip_grad_norm_(params, 1.0).item()
    opt.step()
    for n in names:
        out[f"adamw1.{n}"] = w[n].detach().clone()
    meta = {"grad_norm": repr(norm), "lr": repr(LR)}
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(OUT, f"{kind}_full.safetensors"),
              metadata=meta)
    print(f"{kind}: loss {loss.item():.6f}, grad norm {norm:.4f}, {len(names)} tensors")


if __name__ == "__main__":
    for kind in ("schnell", "dev"):
        make(kind)
