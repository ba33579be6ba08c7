"""A T5-XXL encoder of random weights at its real size, as a Q8_0 GGUF with llama.cpp's T5 names
and metadata (city96's `t5-v1_1-xxl-encoder-Q8_0.gguf` layout: architecture `t5encoder`, norms
and the position bias F32, every matrix Q8_0, the token embedding too): what a studio loads with
`--t5`, for measuring atelier's memory and time on the real shapes (no weights can be
downloaded here). The blocks are valid Q8_0 (an f16 scale and 32 int8 each), values uniform in
±0.05.

    ~/.cache/ref-venv/bin/python scripts/t5xxl_random_gguf.py OUT.gguf [LAYERS]

Needs numpy and gguf 0.19.0. 5.1 GB for the 24 layers; ~1 minute.
"""

import sys

import numpy as np

import gguf
from gguf import GGMLQuantizationType as T

D, DKV, HEADS, FF, VOCAB, BUCKETS = 4096, 64, 64, 10240, 32128, 32


def q8_0(rng, rows, cols):
    blocks = rows * cols // 32
    out = np.empty((blocks, 34), dtype=np.uint8)
    out[:, :2] = np.frombuffer(np.full(blocks, 0.05 / 127, dtype=np.float16).tobytes(), dtype=np.uint8).reshape(-1, 2)
    out[:, 2:] = rng.integers(-127, 128, size=(blocks, 32), dtype=np.int8).view(np.uint8)
    return out.reshape(rows, cols // 32 * 34)


def main():
    path = sys.argv[1]
    layers = int(sys.argv[2]) if len(sys.argv) > 2 else 24
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(path, "t5encoder")
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_file_type(7)
    for key, value in [("context_length", 512), ("embedding_length", D), ("feed_forward_length", FF),
                       ("block_count", layers), ("attention.head_count", HEADS), ("attention.key_length", DKV),
                       ("attention.value_length", DKV)]:
        w.add_uint32(f"t5encoder.{key}", value)
    w.add_float32("t5encoder.attention.layer_norm_epsilon", 1e-6)
    w.add_float32("t5encoder.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_uint32("t5encoder.attention.relative_buckets_count", BUCKETS)
    tensors = {"token_embd.weight": (VOCAB, D), "enc.output_norm.weight": (D,)}
    for i in range(layers):
        b = f"enc.blk.{i}."
        tensors.update({b + "attn_norm.weight": (D,), b + "ffn_norm.weight": (D,)})
        for part in ["attn_q", "attn_k", "attn_v"]:
            tensors[b + part + ".weight"] = (HEADS * DKV, D)
        tensors[b + "attn_o.weight"] = (D, HEADS * DKV)
        tensors[b + "ffn_gate.weight"] = (FF, D)
        tensors[b + "ffn_up.weight"] = (FF, D)
        tensors[b + "ffn_down.weight"] = (D, FF)
    tensors["enc.blk.0.attn_rel_b.weight"] = (BUCKETS, HEADS)
    for name in sorted(tensors):
        shape = tensors[name]
        if len(shape) == 1:
            w.add_tensor(name, np.ones(shape, dtype=np.float32))
        elif ".attn_rel_b." in name:
            w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
        else:
            w.add_tensor(name, q8_0(rng, *shape), raw_dtype=T.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    main()
