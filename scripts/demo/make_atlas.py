#!/usr/bin/env python3
"""The reference set of the demo model's retrieval check: every training emoji at 32x32 (over
white, 2x2 box average of the 64x64 image: what tests/demo.rs does to a generated 64x64 image),
tiled 48 per row into one PNG, and the names in the same order.

    python3 scripts/demo/make_atlas.py DATA_DIR tests/fixtures/demo
(DATA_DIR from scripts/demo/emoji_dataset.py; needs Pillow and numpy)
writes emoji32.png and emoji32.tsv (index, code, name).
"""
import os
import sys

import numpy as np
from PIL import Image

COLS = 48


def main():
    data, out = sys.argv[1], sys.argv[2]
    rows = [line.rstrip("\n").split("\t") for line in open(os.path.join(data, "names.tsv"))]
    tiles = []
    for code, _ in rows:
        img = Image.open(os.path.join(data, "train", code + ".png")).convert("RGBA")
        a = np.asarray(img, dtype=np.float64)
        rgb = a[..., :3] * a[..., 3:] / 255.0 + 255.0 * (1 - a[..., 3:] / 255.0)
        small = rgb.reshape(32, 2, 32, 2, 3).mean(axis=(1, 3))
        tiles.append(np.clip(np.round(small), 0, 255).astype(np.uint8))
    n = len(tiles)
    grid = np.full((((n + COLS - 1) // COLS) * 32, COLS * 32, 3), 255, np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, COLS)
        grid[r * 32:(r + 1) * 32, c * 32:(c + 1) * 32] = t
    os.makedirs(out, exist_ok=True)
    Image.fromarray(grid).save(os.path.join(out, "emoji32.png"), optimize=True)
    with open(os.path.join(out, "emoji32.tsv"), "w") as f:
        for i, (code, name) in enumerate(rows):
            f.write(f"{i}\t{code}\t{name}\n")
    print(f"{n} emoji, {os.path.getsize(os.path.join(out, 'emoji32.png'))} bytes")


if __name__ == "__main__":
    main()
