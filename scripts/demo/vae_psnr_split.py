# Where a demo VAE's reconstruction error lies (torch + diffusers, kept out of CI): the mean 8-bit
# PSNR of decode(encode mean) on the hold-out (skin-tone variants), on those variants' yellow
# originals (in the training set) and on every 19th training emoji, for each VAE folder given.
#   DATA=<train_demo.sh data folder> ~/.cache/ref-venv/bin/python scripts/demo/vae_psnr_split.py VAE...
# 2026-12-05 (weights/demo/README.md): the VAE before `--keep-latents` 21.13 / 22.19 / 23.19 dB,
# after 21.74 / 23.30 / 24.40.
import glob, os, re, sys
import torch
from diffusers import AutoencoderKL
sys.path.insert(0, os.path.dirname(__file__))
from probe_data import DATA, load

torch.set_num_threads(2)
holdout = DATA + "/holdout"
originals = sorted({re.sub(r"-1f3f[b-f]", "", os.path.basename(p)) for p in glob.glob(holdout + "/*.png")})
originals = [DATA + "/train/" + n for n in originals if os.path.exists(DATA + "/train/" + n)]
every_19th = sorted(glob.glob(DATA + "/train/*.png"))[::19][:100]


def psnr(vae, x):
    with torch.no_grad():
        y = torch.cat([vae.decode(vae.encode(x[i:i + 100]).latent_dist.mean).sample for i in range(0, len(x), 100)])
    byte = lambda t: ((t.clamp(-1, 1) + 1) * 127.5).round()
    mse = ((byte(x) - byte(y)) ** 2).mean(dim=(1, 2, 3)).double()
    return (10 * torch.log10(255 ** 2 / mse)).mean().item()


sets = {"hold-out": load(holdout), "its originals": load(originals), "every 19th training emoji": load(every_19th)}
for path in sys.argv[1:]:
    vae = AutoencoderKL.from_pretrained(path).eval()
    print(path, "; ".join(f"{k} ({len(x)}) {psnr(vae, x):.2f} dB" for k, x in sets.items()))
