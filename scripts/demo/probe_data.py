# The demo data as the VAE probes read it (torch; kept out of CI): a folder's PNGs composited on
# white, as [N, 3, 64, 64] in [-1, 1], the way atelier's dataset reader sees them.
import glob, os
import numpy as np, torch
from PIL import Image

DATA = os.environ.get("DATA", "/work/demo11/data")


def load(d):
    """A folder's PNGs, or a list of PNG paths."""
    xs = []
    for p in d if isinstance(d, list) else sorted(glob.glob(d + "/*.png")):
        im = Image.open(p).convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im).convert("RGB")
        xs.append(torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1))
    return torch.stack(xs)
