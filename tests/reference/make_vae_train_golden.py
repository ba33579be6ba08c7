"""VAE training golden: the loss of atelier's VAE trainer (L1 + 0.01 * KL on the
reparameterized posterior, train::vae::vae_loss) and the gradient of every weight, in torch
with diffusers' AutoencoderKL, for the tiny VAE of tests/fixtures/pipeline/schnell.

Writes tests/fixtures/train/vae.safetensors with
  x [2, 3, 32, 32]   images in [-1, 1] (seeded)
  eps [2, 16, 4, 4]  the posterior noise
  loss, l1, kl [1]
  grad.<diffusers key>  dloss/dW of every weight of the checkpoint
Deterministic; ~2 s.

    /root/.cache/ref-venv/bin/python tests/reference/make_vae_train_golden.py
"""
import os

import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
KL_WEIGHT = 0.01

torch.set_num_threads(2)


def main():
    vae = AutoencoderKL.from_pretrained(os.path.join(ROOT, "tests", "fixtures", "pipeline", "schnell", "diffusers", "vae"))
    vae.float()
    gen = torch.Generator().manual_seed(11)
    x = torch.rand((2, 3, 32, 32), generator=gen) * 2 - 1
    eps = torch.randn((2, 16, 4, 4), generator=gen)
    dist = vae.encode(x).latent_dist  # mean, logvar clamped to [-30, 20]
    z = dist.mean + torch.exp(0.5 * dist.logvar) * eps
    recon = vae.decode(z).sample
    l1 = (recon - x).abs().mean()
    kl = 0.5 * (dist.mean ** 2 + torch.exp(dist.logvar) - 1 - dist.logvar).mean()
    loss = l1 + KL_WEIGHT * kl
    loss.backward()
    out = {"x": x, "eps": eps, "loss": loss.detach().reshape(1), "l1": l1.detach().reshape(1),
           "kl": kl.detach().reshape(1)}
    for name, p in vae.named_parameters():
        out[f"grad.{name}"] = p.grad.clone()
    path = os.path.join(ROOT, "tests", "fixtures", "train", "vae.safetensors")
    save_file({k: v.contiguous() for k, v in out.items()}, path, metadata={"kl_weight": repr(KL_WEIGHT)})
    os.chmod(path, 0o644)
    print(f"loss {loss.item():.6f} (l1 {l1.item():.6f}, kl {kl.item():.6f}), {len(out) - 5} gradients")


if __name__ == "__main__":
    main()
