#!/usr/bin/env python3
"""The README's pictures of the shipped demo model: a strip of emoji named in plain words
(docs/demo/strip.png) and a contact sheet of 20 prompts that combine words of different emoji
(docs/demo/combinations.png), each under its prompt. Needs numpy and Pillow and a built
`atelier` (ATELIER, else $CARGO_TARGET_DIR or target/release).

    python scripts/demo/readme_images.py [MODEL_DIR]      (default weights/demo/dev)
"""
import os
import subprocess
import sys
import tempfile

from PIL import Image, ImageDraw

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
STRIP = ["red heart", "grinning face", "cat face", "red apple", "rocket", "sun with face", "rainbow", "pile of poo"]
COMBINATIONS = [
    "red cat face", "blue heart face", "green apple face", "yellow rocket", "cat with heart",
    "dog with sunglasses", "red rainbow", "smiling sun", "purple apple", "heart with rocket",
    "crying cat", "pizza face", "blue fire", "angry sun", "green heart with ribbon",
    "laughing dog", "orange moon", "red tree", "cat on fire", "ghost with hat",
]
TILE = 128  # 64² shown 2× (nearest), as the UI upscales


def binary():
    if "ATELIER" in os.environ:
        return os.environ["ATELIER"]
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    return os.path.join(target, "release", "atelier")


def sheet(model, prompts, columns, out, work):
    rows = (len(prompts) + columns - 1) // columns
    label = 30
    img = Image.new("RGB", (columns * TILE, rows * (TILE + label)), "white")
    draw = ImageDraw.Draw(img)
    for k, prompt in enumerate(prompts):
        png = os.path.join(work, f"{k:02d}.png")
        cmd = [binary(), "generate", "--model", model, "--prompt", prompt, "--seed", str(k),
               "--width", "64", "--height", "64", "--device", "cpu", "--out", png]
        subprocess.run(cmd, check=True, capture_output=True)
        x, y = (k % columns) * TILE, (k // columns) * (TILE + label)
        img.paste(Image.open(png).convert("RGB").resize((TILE, TILE), Image.NEAREST), (x, y))
        draw.text((x + 4, y + TILE + 4), prompt if len(prompt) <= 20 else prompt[:19] + "…", fill="black")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    img.save(out, optimize=True)
    print(f"wrote {out}")


def main():
    model = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "weights/demo/dev")
    with tempfile.TemporaryDirectory() as work:
        sheet(model, STRIP, len(STRIP), os.path.join(ROOT, "docs/demo/strip.png"), work)
        sheet(model, COMBINATIONS, 5, os.path.join(ROOT, "docs/demo/combinations.png"), work)


if __name__ == "__main__":
    main()
