#!/usr/bin/env python3
"""Retrieval of a demo-recipe checkpoint while it trains: the measure of tests/demo.rs (the
generated image's nearest training emoji, L2 on 32×32 pixels, among all 1911) on N names, with
the dev-like sampler, without waiting for the run to end. Needs numpy and pillow (the recipe's
PYTHON) and a built `atelier`.

    python scripts/demo/eval_checkpoint.py WORK STATE [N] [IMAGES]

WORK is a recipe folder (train_demo.sh's argument), STATE a `state.safetensors` of
WORK/schnell_train/checkpoints/step_*/ or a finished run's output (WORK/schnell.safetensors),
or the same of another `train --full` run on WORK's pipeline,
N the number of names (default 20, every (count/N)-th), IMAGES the training folder whose emoji
are asked for (default WORK/data/train; a subset when the run trained on one). Prints hits and
the rank of the named emoji among all (0 = nearest); images land in STATE's folder/eval/.
"""
import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
from PIL import Image

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")


def read(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n)), f.read()


def export(state, ref_path, out, prefix="", meta=None):
    """The checkpoint's weights (those named `prefix` + a name of `ref_path`) as an f16 file
    shaped like `ref_path` (the run's init.safetensors, or an encoder's model.safetensors).
    Checkpoints hold burn's layout: flat, Linear weights as [in, out] (the ones the
    `transposed` metadata names; before it existed, every matrix was a transformer Linear)."""
    ref, _ = read(ref_path)
    st, data = read(state)
    ref.pop("__metadata__", None)
    transposed = st["__metadata__"].get("transposed")
    transposed = set(json.loads(transposed)) if transposed is not None else None
    header, blobs, offset = {}, [], 0
    for name in sorted(ref):
        a, b = st[prefix + name]["data_offsets"]
        shape = ref[name]["shape"]
        v = np.frombuffer(data[a:b], dtype=np.float32)
        if len(shape) == 2 and (transposed is None or prefix + name in transposed):
            v = v.reshape(shape[::-1]).T
        v = v.reshape(shape).astype(np.float16)
        blobs.append(np.ascontiguousarray(v).tobytes())
        header[name] = {"dtype": "F16", "shape": shape, "data_offsets": [offset, offset + len(blobs[-1])]}
        offset += len(blobs[-1])
    if meta:
        header["__metadata__"] = meta
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(out, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    work, state = sys.argv[1], sys.argv[2]
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 20
    images = sys.argv[4] if len(sys.argv) > 4 else os.path.join(work, "data", "train")
    out = os.path.join(os.path.dirname(state), "eval")
    os.makedirs(out, exist_ok=True)

    # A dev-like pipeline folder: the recipe's encoders and VAE, the fixtures' dev scheduler.
    dev = os.path.join(out, "dev")
    shutil.rmtree(dev, ignore_errors=True)
    os.makedirs(os.path.join(dev, "transformer"))
    # Text encoders trained with the transformer (--train-text-encoders) come from the checkpoint
    # or from the folders beside a finished run's file; frozen ones from the pipeline.
    header = read(state)[0]
    from_checkpoint = "settings" in header.get("__metadata__", {})
    stem = os.path.splitext(state)[0]
    for part in ("text_encoder", "text_encoder_2", "vae"):
        source = os.path.join(work, "pipeline", part)
        if from_checkpoint and any(k.startswith(part + ".") for k in header):
            os.makedirs(os.path.join(dev, part))
            shutil.copy(os.path.join(source, "config.json"), os.path.join(dev, part))
            export(state, os.path.join(source, "model.safetensors"), os.path.join(dev, part, "model.safetensors"), part + ".")
        elif not from_checkpoint and os.path.isdir(f"{stem}_{part}"):
            shutil.copytree(f"{stem}_{part}", os.path.join(dev, part))
        else:
            os.symlink(os.path.abspath(source), os.path.join(dev, part))
    fixture = os.path.join(ROOT, "tests/fixtures/pipeline/dev/diffusers")
    shutil.copytree(os.path.join(fixture, "scheduler"), os.path.join(dev, "scheduler"))
    shutil.copy(os.path.join(fixture, "model_index.json"), dev)
    schnell = os.path.join(out, "schnell.safetensors")
    if from_checkpoint:
        init = os.path.join(os.path.dirname(state), "..", "..", "init.safetensors")
        if not os.path.exists(init):
            init = os.path.join(work, "schnell_train", "init.safetensors")
        meta = read(init)[0].get("__metadata__", {})
        meta["max_sequence_length"] = str(json.loads(header["__metadata__"]["settings"])["max_sequence_length"])
        export(state, init, schnell, meta=meta)
    else:  # a finished run's output: already in BFL layout
        shutil.copy(state, schnell)
    weights = os.path.join(dev, "transformer", "diffusion_pytorch_model.safetensors")
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts/demo/add_zero_guidance.py"), schnell, weights], check=True)
    with open(os.path.join(ROOT, "scripts/demo/transformer.json")) as f:
        config = json.load(f)
    config["guidance_embeds"] = True
    with open(os.path.join(dev, "transformer", "config.json"), "w") as f:
        json.dump(config, f)

    fixtures = os.path.join(ROOT, "tests/fixtures/demo")
    atlas = np.asarray(Image.open(os.path.join(fixtures, "emoji32.png")).convert("RGB"), dtype=np.float32) / 255
    rows = [line.rstrip("\n").split("\t") for line in open(os.path.join(fixtures, "emoji32.tsv"))]
    tiles = np.stack([atlas[(i // 48) * 32 : (i // 48 + 1) * 32, (i % 48) * 32 : (i % 48 + 1) * 32] for i in range(len(rows))])
    tiles = tiles.reshape(len(rows), -1)
    index = {code: int(i) for i, code, _ in rows}
    asked = [index[f[: -len(".png")]] for f in sorted(os.listdir(images)) if f.endswith(".png")]
    asked = asked[:: max(1, len(asked) // n)][:n]

    binary = os.environ.get("ATELIER", os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "release", "atelier"))
    ranks = []
    for k, i in enumerate(asked):
        png = os.path.join(out, f"{k:03d}.png")
        cmd = [binary, "generate", "--model", dev, "--prompt", rows[i][2], "--seed", str(k), "--width", "64", "--height", "64", "--device", "cpu", "--out", png]
        subprocess.run(cmd, check=True, capture_output=True)
        img = np.asarray(Image.open(png).convert("RGB"), dtype=np.float32) / 255
        small = img.reshape(32, 2, 32, 2, 3).mean((1, 3)).reshape(-1)
        d = ((tiles - small) ** 2).sum(1)
        ranks.append(int((d < d[i]).sum()))
    hits = sum(r == 0 for r in ranks)
    print(f"{state}: {hits}/{len(ranks)} named emoji nearest, median rank {int(np.median(ranks))} of {len(rows)}; ranks {ranks}")


if __name__ == "__main__":
    main()
