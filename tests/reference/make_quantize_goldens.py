"""Goldens for `atelier quantize` (tests/fixtures/quantize/).

Run from the repository root with the reference venv (numpy, torch, safetensors, gguf 0.19.0):

    nice -n 10 "$REF_VENV/bin/python" tests/reference/make_quantize_goldens.py

The tiny schnell pipeline transformer (pipeline/single/flux_schnell_bfl.safetensors) written by
the `gguf` package's own GGUFWriter the way city96's ComfyUI-GGUF convert + llama.cpp patch
lays out FLUX files:
  - general.architecture "flux", general.quantization_version 2, general.file_type (llama.cpp's
    LLAMA_FTYPE numbers: Q8_0 7, Q5_0 8, Q4_0 2, F16 1, BF16 32), then axes_dims_rope (the tiny
    model's RoPE split; FLUX's own head dim 128 needs none), tensors sorted by name;
  - 1-D tensors and tensors of <= 1024 values in F32; img_in / time_in.in_layer /
    vector_in.in_layer / guidance_in.in_layer / final_layer.linear in F16 (BF16 in a bf16
    file); other tensors in the target type, F16 (BF16) where rows are not whole blocks.
Writes
  quantize/flux_schnell_{q8_0,q5_0,q4_0,f16,bf16}.gguf   the files, byte for byte what atelier
                                                         must write for the same input
  quantize/flux_schnell_q5_0_f32.safetensors             gguf.quants.dequantize of the Q5_0
                                                         file as GGUFReader reads it back
"""

import os

import numpy as np
from safetensors.numpy import save_file
from safetensors.torch import load_file

import gguf
from gguf import GGMLQuantizationType as T

ROOT = "tests/fixtures"
OUT = os.path.join(ROOT, "quantize")
AXES = "[4,6,6]"
KEEP_F16 = ("img_in.", "time_in.in_layer.", "vector_in.in_layer.", "guidance_in.in_layer.", "final_layer.linear.")
TARGETS = {"q8_0": (T.Q8_0, 7), "q5_0": (T.Q5_0, 8), "q4_0": (T.Q4_0, 2), "f16": (T.F16, 1), "bf16": (T.BF16, 32)}


def type_for(key, x, target):
    sixteen = T.BF16 if target == T.BF16 else T.F16
    if x.ndim <= 1 or x.size <= 1024:
        return T.F32
    block, _ = gguf.GGML_QUANT_SIZES[target]
    if key.startswith(KEEP_F16) or x.shape[-1] % block != 0:
        return sixteen
    return target


def write(name, target, file_type):
    src = load_file(os.path.join(ROOT, "pipeline/single/flux_schnell_bfl.safetensors"))
    path = os.path.join(OUT, f"flux_schnell_{name}.gguf")
    w = gguf.GGUFWriter(path, "flux")
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_file_type(file_type)
    w.add_string("axes_dims_rope", AXES)
    counts = {}
    for key in sorted(src):
        x = src[key].float().numpy()
        ty = type_for(key, x, target)
        counts[ty.name] = counts.get(ty.name, 0) + 1
        if ty == T.F32:
            w.add_tensor(key, x)
        elif ty == T.F16:
            w.add_tensor(key, x.astype(np.float16))
        else:
            w.add_tensor(key, gguf.quants.quantize(x, ty), raw_dtype=ty)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(name, counts, os.path.getsize(path), "bytes")
    return path


def dequantized(path):
    out = {}
    for t in gguf.GGUFReader(path).tensors:
        shape = [int(d) for d in reversed(t.shape)]
        out[t.name] = np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape))
    return out


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    for name, (target, file_type) in TARGETS.items():
        path = write(name, target, file_type)
        if name == "q5_0":
            save_file(dequantized(path), os.path.join(OUT, "flux_schnell_q5_0_f32.safetensors"))
