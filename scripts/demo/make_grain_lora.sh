#!/usr/bin/env bash
# The shipped demo LoRA (weights/loras/demo-grain.safetensors): trained by `atelier train` on the
# shipped demo model from 4 emoji turned into old film photos (sepia, grain, vignette; trigger
# "grainy film"), so the LoRA picker does something visible on a fresh install.
#
#   bash scripts/demo/make_grain_lora.sh DATA_DIR [WORK_DIR]
#
# DATA_DIR is the emoji data of scripts/demo/emoji_dataset.py (its train/ folder); PYTHON must
# have numpy and Pillow. Reproducible: fixed emoji, fixed grain seed, --seed 1.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=$1
W=${2:-target/demo-grain}
PYTHON=${PYTHON:-python3}
rm -rf "$W" && mkdir -p "$W/images"

"$PYTHON" - "$DATA/train" "$W/images" <<'EOF'
import sys
import numpy as np
from PIL import Image

src, dst = sys.argv[1], sys.argv[2]
rng = np.random.default_rng(1)
for code in ["1f34e", "1f431", "1f680", "1f308"]:  # red apple, cat face, rocket, rainbow
    rgba = Image.open(f"{src}/{code}.png").convert("RGBA")
    img = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    img.alpha_composite(rgba)
    x = np.asarray(img.convert("RGB"), dtype=np.float64) / 255
    gray = x @ [0.299, 0.587, 0.114]
    sepia = np.stack([gray * 1.07, gray * 0.86, gray * 0.62], -1) * 0.9 + 0.06
    h, w = gray.shape
    yy, xx = np.mgrid[0:h, 0:w]
    r = np.hypot((yy - h / 2) / (h / 2), (xx - w / 2) / (w / 2))
    vignette = (1 - 0.35 * np.clip(r - 0.4, 0, None))[..., None]
    grain = rng.normal(0, 0.06, (h, w, 1))
    out = np.clip(sepia * vignette + grain, 0, 1)
    Image.fromarray((out * 255).round().astype(np.uint8)).save(f"{dst}/{code}.png")
    name = open(f"{src}/{code}.txt").readline().strip()
    with open(f"{dst}/{code}.txt", "w") as f:
        f.write(f"grainy film, {name}\n")
EOF

A=target/release/atelier
if [ -n "${CARGO_TARGET_DIR:-}" ]; then A=$CARGO_TARGET_DIR/release/atelier; fi
"$A" train --model weights/demo/schnell --images "$W/images" --trigger "grainy film" \
  --out "$W/demo-grain.safetensors" --steps 300 --rank 4 --alpha 4 --lr 1e-3 --batch 4 \
  --resolution 64 --caption-dropout 0 --seed 1 --device cpu
cp "$W/demo-grain.safetensors" weights/loras/demo-grain.safetensors
echo "wrote weights/loras/demo-grain.safetensors"
