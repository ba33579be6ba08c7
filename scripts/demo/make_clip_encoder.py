#!/usr/bin/env python3
"""The demo's CLIP text encoder: a CLIPTextModel with random weights, fixed by a seed and shipped
(never trained). It is wider than the pipeline fixtures' (hidden 16 instead of 4) because its
pooled output is the transformer's only per-prompt vector: after the final LayerNorm a width of
4 leaves 2 degrees of freedom, too few to tell 1911 emoji names apart, and the demo transformer
then learned to ignore the prompt.

The weights follow transformers' CLIP initialisation (normal, std 0.02 embeddings; q/k/v and fc2
d^-0.5 (2L)^-0.5, out_proj d^-0.5, fc1 (2d)^-0.5; zero biases; LayerNorms 1 and 0), drawn with
numpy from SEED, stored in f16 under the fixtures' tensor names, with a transformers config.

    python3 scripts/demo/make_clip_encoder.py OUT_DIR [SEED]

needs numpy.
"""
import json
import os
import struct
import sys

import numpy as np

HIDDEN = 16
LAYERS = 2
HEADS = 2
INTERMEDIATE = 64
VOCAB = 49408
POSITIONS = 77


def weights(seed):
    rng = np.random.default_rng(seed)
    d, n = HIDDEN, LAYERS
    in_std = d**-0.5 * (2 * n) ** -0.5
    out_std = d**-0.5
    fc_std = (2 * d) ** -0.5
    w = {
        "embeddings.token_embedding.weight": rng.normal(0, 0.02, (VOCAB, d)),
        "embeddings.position_embedding.weight": rng.normal(0, 0.02, (POSITIONS, d)),
    }
    for i in range(n):
        p = f"encoder.layers.{i}."
        for proj, std in [("q_proj", in_std), ("k_proj", in_std), ("v_proj", in_std), ("out_proj", out_std)]:
            w[p + f"self_attn.{proj}.weight"] = rng.normal(0, std, (d, d))
            w[p + f"self_attn.{proj}.bias"] = np.zeros(d)
        w[p + "mlp.fc1.weight"] = rng.normal(0, fc_std, (INTERMEDIATE, d))
        w[p + "mlp.fc1.bias"] = np.zeros(INTERMEDIATE)
        w[p + "mlp.fc2.weight"] = rng.normal(0, in_std, (d, INTERMEDIATE))
        w[p + "mlp.fc2.bias"] = np.zeros(d)
        for norm in ["layer_norm1", "layer_norm2"]:
            w[p + f"{norm}.weight"] = np.ones(d)
            w[p + f"{norm}.bias"] = np.zeros(d)
    w["final_layer_norm.weight"] = np.ones(d)
    w["final_layer_norm.bias"] = np.zeros(d)
    return w


def write_safetensors(path, tensors):
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name in sorted(tensors):
        blob = tensors[name].astype("<f2").tobytes()
        header[name] = {"dtype": "F16", "shape": list(tensors[name].shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for blob in blobs:
            f.write(blob)


CONFIG = {
    "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dtype": "float16",
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": HIDDEN,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": INTERMEDIATE,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": POSITIONS,
    "model_type": "clip_text_model",
    "num_attention_heads": HEADS,
    "num_hidden_layers": LAYERS,
    "pad_token_id": 1,
    "projection_dim": HIDDEN,
    "vocab_size": VOCAB,
}


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    out = sys.argv[1]
    seed = int(sys.argv[2]) if len(sys.argv) == 3 else 1
    os.makedirs(out, exist_ok=True)
    write_safetensors(os.path.join(out, "model.safetensors"), weights(seed))
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(CONFIG, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
