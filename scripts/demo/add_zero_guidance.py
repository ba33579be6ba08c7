#!/usr/bin/env python3
"""Makes the dev-like demo transformer from the schnell-like one: the same weights plus a
guidance embedding (`guidance_in.*`) whose every weight is zero, so guidance_in(g) = 0 for any g
and the dev-like model computes exactly what the schnell-like one does (its sampler takes more
steps; the guidance value has no effect). Standard library only.

    python3 scripts/demo/add_zero_guidance.py IN.safetensors OUT.safetensors
    python3 scripts/demo/add_zero_guidance.py --shards IN.safetensors OUT_DIR

The first writes one file. The second writes a sharded diffusers transformer folder whose first
shard is IN itself (the caller links `diffusion_pytorch_model-00001-of-00002.safetensors` to it)
and whose second holds only the guidance embedding, with the index.json mapping both: what
weights/demo/dev ships, so the two demo models store their shared weights once.
"""
import json
import struct
import sys

SHARDS = ["diffusion_pytorch_model-00001-of-00002.safetensors", "diffusion_pytorch_model-00002-of-00002.safetensors"]


def read(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        return header, f.read()


def write(path, header, data):
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        f.write(data)


def zero_guidance(header):
    """The guidance embedding's header entries (offsets from 0) and its zero bytes."""
    hidden, _ = header["time_in.out_layer.weight"]["shape"]
    dtype = header["time_in.out_layer.weight"]["dtype"]
    size = {"F32": 4, "F16": 2, "BF16": 2}[dtype]
    out, offset = {}, 0
    for name, shape in [("in_layer.weight", [hidden, 256]), ("in_layer.bias", [hidden]),
                        ("out_layer.weight", [hidden, hidden]), ("out_layer.bias", [hidden])]:
        count = 1
        for d in shape:
            count *= d
        out[f"guidance_in.{name}"] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + count * size]}
        offset += count * size
    return out, bytes(offset)  # zeros in every float format


def main():
    args = sys.argv[1:]
    shards = args[:1] == ["--shards"]
    if shards:
        args = args[1:]
    if len(args) != 2:
        sys.exit(__doc__)
    src, dst = args
    header, data = read(src)
    meta = header.pop("__metadata__", {})
    if any(k.startswith("guidance_in.") for k in header):
        sys.exit(f"{src} already has a guidance embedding")
    guidance, zeros = zero_guidance(header)
    if shards:
        write(f"{dst}/{SHARDS[1]}", guidance, zeros)
        weight_map = {name: SHARDS[0] for name in header}
        weight_map.update({name: SHARDS[1] for name in guidance})
        index = {"metadata": {"total_size": len(data) + len(zeros)}, "weight_map": dict(sorted(weight_map.items()))}
        with open(f"{dst}/diffusion_pytorch_model.safetensors.index.json", "w") as f:
            json.dump(index, f, indent=1)
        return
    for entry in guidance.values():
        entry["data_offsets"] = [o + len(data) for o in entry["data_offsets"]]
    header.update(guidance)
    if meta:
        header["__metadata__"] = meta
    write(dst, header, data + zeros)


if __name__ == "__main__":
    main()
