"""Goldens for GGUF and fp8 reading (tests/fixtures/gguf/, tests/fixtures/fp8/).

Run from the repository root with the reference venv (numpy, torch, safetensors, gguf):

    nice -n 10 "$REF_VENV/bin/python" tests/reference/make_gguf_goldens.py

Writes
  gguf/blocks.gguf               one tensor per ggml type (F32 F16 BF16 Q8_0 Q4_0 Q4_1 Q5_0 Q5_1
                                 Q2_K..Q6_K), random bytes with finite f16 scale fields,
                                 general.architecture = "flux"
  gguf/blocks_golden.safetensors gguf.quants.dequantize of each tensor as read back by
                                 GGUFReader, F32, PyTorch shape (ggml dims reversed)
  gguf/flux_schnell_{q8_0,q4_0}.gguf
                                 the tiny schnell pipeline transformer (pipeline/single/
                                 flux_schnell_bfl.safetensors) as city96's convert writes it:
                                 BFL keys, arch "flux", metadata axes_dims_rope; 2-D weights whose rows are whole blocks are
                                 quantized, 1-D tensors F32, img_in / time_in.in_layer /
                                 vector_in.in_layer / guidance_in.in_layer / final_layer.linear F16.
                                 (city96 also keeps tensors of <= 1024 values unquantized; the tiny
                                 model would then have nothing quantized, so that rule is dropped.)
  gguf/flux_schnell_{q8_0,q4_0}_f32.safetensors
                                 the same, dequantized by the gguf package: F32, BFL keys
  fp8/fp8.safetensors            plain e4m3fn / e5m2 tensors (all 256 byte values), and ComfyUI
                                 scaled fp8: `scaled_fp8` marker, `x.scale_weight` (scalar),
                                 `y.weight_scale` (per row), `x.scale_input`
  fp8/fp8_golden.safetensors     torch's conversion: w.to(float32) [* scale.to(float32)]
  fp8/flux_schnell_scaled_fp8.safetensors
                                 the tiny schnell transformer as scaled e4m3fn (per-tensor
                                 scale = absmax / 448), with the marker key
"""

import os

import numpy as np
import torch
from safetensors.numpy import save_file as save_np
from safetensors.torch import load_file, save_file

import gguf
from gguf import GGMLQuantizationType as T

ROOT = "tests/fixtures"
GG = os.path.join(ROOT, "gguf")
F8 = os.path.join(ROOT, "fp8")

# Offsets of the f16 scale fields in each block type (ggml-common.h).
F16_FIELDS = {
    T.Q8_0: [0], T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2],
    T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208],
}


def random_blocks(rng, qtype, rows, cols):
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    assert cols % block == 0
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        scales = (rng.standard_normal((rows, cols // block)) * 0.05).astype(np.float16)
        raw[:, :, off:off + 2] = scales.view(np.uint8).reshape(rows, cols // block, 2)
    return raw.reshape(rows, -1)


def blocks():
    rng = np.random.default_rng(14)
    w = gguf.GGUFWriter(os.path.join(GG, "blocks.gguf"), "flux")
    rows, cols = 3, 512
    w.add_tensor("f32", rng.standard_normal((rows, cols)).astype(np.float32))
    w.add_tensor("f16", rng.standard_normal((2, 4, 64)).astype(np.float16))
    bf = rng.standard_normal((rows, cols)).astype(np.float32).view(np.uint32) >> 16
    w.add_tensor("bf16", bf.astype(np.uint16).view(np.uint8), raw_dtype=T.BF16)
    for qtype in F16_FIELDS:
        w.add_tensor(qtype.name.lower(), random_blocks(rng, qtype, rows, cols), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    golden = {}
    for t in gguf.GGUFReader(os.path.join(GG, "blocks.gguf")).tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        shape = [int(d) for d in reversed(t.shape)]
        golden[t.name] = np.ascontiguousarray(values.reshape(shape))
        assert np.isfinite(golden[t.name]).all(), t.name
    save_np(golden, os.path.join(GG, "blocks_golden.safetensors"))
    print("blocks:", {k: v.shape for k, v in golden.items()})


AXES = "[4, 6, 6]"
KEEP_F16 = ("img_in.", "time_in.in_layer.", "vector_in.in_layer.", "guidance_in.in_layer.", "final_layer.linear.")


def flux_gguf(qtype):
    src = load_file(os.path.join(ROOT, "pipeline/single/flux_schnell_bfl.safetensors"))
    name = f"flux_schnell_{qtype.name.lower()}"
    w = gguf.GGUFWriter(os.path.join(GG, name + ".gguf"), "flux")
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    # The tiny model's RoPE split cannot be read off its shapes (atelier reads this key).
    w.add_string("axes_dims_rope", AXES)
    kinds = {}
    for key in sorted(src):
        x = src[key].float().numpy()
        block, _ = gguf.GGML_QUANT_SIZES[qtype]
        if x.ndim == 1:
            w.add_tensor(key, x)
            kinds[key] = "F32"
        elif key.startswith(KEEP_F16) or x.shape[-1] % block != 0:
            w.add_tensor(key, x.astype(np.float16))
            kinds[key] = "F16"
        else:
            w.add_tensor(key, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
            kinds[key] = qtype.name
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    out = {}
    for t in gguf.GGUFReader(os.path.join(GG, name + ".gguf")).tensors:
        shape = [int(d) for d in reversed(t.shape)]
        out[t.name] = torch.from_numpy(
            np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)))
        assert list(out[t.name].shape) == list(src[t.name].shape), t.name
    save_file(out, os.path.join(GG, name + "_f32.safetensors"), metadata={"axes_dims_rope": AXES})
    counts = {}
    for k in kinds.values():
        counts[k] = counts.get(k, 0) + 1
    print(name, counts, os.path.getsize(os.path.join(GG, name + ".gguf")), "bytes")


def fp8():
    g = torch.Generator().manual_seed(14)
    every = torch.arange(256, dtype=torch.uint8).reshape(16, 16)
    t = {
        "plain.e4m3.weight": every.clone().view(torch.float8_e4m3fn),
        "plain.e5m2.weight": every.clone().view(torch.float8_e5m2),
        "scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn),
        "x.weight": (torch.randn(8, 32, generator=g) * 100).to(torch.float8_e4m3fn),
        "x.scale_weight": torch.tensor(0.0123, dtype=torch.float32),
        "x.scale_input": torch.tensor(1.0, dtype=torch.float32),
        "y.weight": (torch.randn(6, 32, generator=g) * 100).to(torch.float8_e4m3fn),
        "y.weight_scale": torch.rand(6, generator=g) * 0.01,
        "y.bias": torch.randn(6, generator=g),
    }
    save_file(t, os.path.join(F8, "fp8.safetensors"))
    golden = {
        "plain.e4m3.weight": t["plain.e4m3.weight"].to(torch.float32),
        "plain.e5m2.weight": t["plain.e5m2.weight"].to(torch.float32),
        "x.weight": t["x.weight"].to(torch.float32) * t["x.scale_weight"].to(torch.float32),
        "y.weight": t["y.weight"].to(torch.float32) * t["y.weight_scale"].to(torch.float32).reshape(-1, 1),
        "y.bias": t["y.bias"],
    }
    save_file(golden, os.path.join(F8, "fp8_golden.safetensors"))

    src = load_file(os.path.join(ROOT, "pipeline/single/flux_schnell_bfl.safetensors"))
    out = {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}
    for key, x in src.items():
        x = x.float()
        if key.endswith(".weight") and x.ndim == 2:
            scale = x.abs().max() / 448.0
            out[key] = (x / scale).to(torch.float8_e4m3fn)
            out[key[: -len("weight")] + "scale_weight"] = scale.reshape(())
        else:
            out[key] = x.to(torch.bfloat16)
    save_file(out, os.path.join(F8, "flux_schnell_scaled_fp8.safetensors"), metadata={"axes_dims_rope": AXES})
    print("fp8 done")


if __name__ == "__main__":
    os.makedirs(GG, exist_ok=True)
    os.makedirs(F8, exist_ok=True)
    blocks()
    flux_gguf(T.Q8_0)
    flux_gguf(T.Q4_0)
    fp8()
