#!/usr/bin/env python3
"""Makes the dev-like demo transformer from the schnell-like one: the same weights plus a
guidance embedding (`guidance_in.*`) whose every weight is zero, so guidance_in(g) = 0 for any g
and the dev-like model computes exactly what the schnell-like one does (its sampler takes more
steps; the guidance value has no effect). Standard library only.

    python3 scripts/demo/add_zero_guidance.py IN.safetensors OUT.safetensors
"""
import json
import struct
import sys


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    src, dst = sys.argv[1], sys.argv[2]
    with open(src, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    meta = header.pop("__metadata__", {})
    if any(k.startswith("guidance_in.") for k in header):
        sys.exit(f"{src} already has a guidance embedding")
    hidden, _ = header["time_in.out_layer.weight"]["shape"]
    dtype = header["time_in.out_layer.weight"]["dtype"]
    size = {"F32": 4, "F16": 2, "BF16": 2}[dtype]
    offset = len(data)
    extra = b""
    for name, shape in [("in_layer.weight", [hidden, 256]), ("in_layer.bias", [hidden]),
                        ("out_layer.weight", [hidden, hidden]), ("out_layer.bias", [hidden])]:
        count = 1
        for d in shape:
            count *= d
        header[f"guidance_in.{name}"] = {"dtype": dtype, "shape": shape,
                                         "data_offsets": [offset, offset + count * size]}
        offset += count * size
        extra += bytes(count * size)  # zeros in every float format
    if meta:
        header["__metadata__"] = meta
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(dst, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        f.write(data)
        f.write(extra)


if __name__ == "__main__":
    main()
