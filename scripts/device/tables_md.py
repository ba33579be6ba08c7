#!/usr/bin/env python3
"""Turns gpu_tables.sh's tables.jsonl into the markdown rows docs/speed.md keeps, with FLUX.1-dev's
19 + 38 blocks extrapolated from the 1 + 2 and 2 + 4 block rows:
t(19 + 38) ≈ t(1 + 2) + 18 × (t(2 + 4) − t(1 + 2)), the same for the device memory.
    python3 scripts/device/tables_md.py OUT/tables.jsonl"""
import json
import sys

rows = [json.loads(line) for line in open(sys.argv[1])]
by = {r["label"]: r for r in rows}


def step(r):
    b = r.get("bench") or {}
    if "step" in b:
        return b["step"]["median_seconds"]
    if "decode" in b:
        return b["decode"]["median_seconds"]
    return None


def mib(v):
    return "–" if v is None else f"{v:,}"


print("| row | dtype | step (median s) | device peak MiB | host peak RSS MiB | file MiB | rc |")
print("|---|---|---|---|---|---|---|")
for r in rows:
    b = r.get("bench") or {}
    cfg = b.get("config") or b.get("vae") or {}
    s = step(r)
    rss = (b.get("rss_bytes") or {}).get("peak_during_steps") or (b.get("decode") or {}).get("peak_rss_bytes")
    fb = b.get("gguf_file_bytes") or b.get("file_bytes")
    print(f"| {r['label']} | {cfg.get('dtype', '–')} | {'–' if s is None else f'{s:.3f}'} | "
          f"{mib(r['device_peak_mib'])} | {mib(rss and rss >> 20)} | {mib(fb and fb >> 20)} | {r['rc']} |")

for tag in ("f16",):
    a, b = by.get(f"dev-1+2-{tag}"), by.get(f"dev-2+4-{tag}")
    if a and b and step(a) and step(b):
        t = step(a) + 18 * (step(b) - step(a))
        line = f"\nFLUX.1-dev (19 + 38 blocks, 4096 + 512 tokens, {tag}) extrapolated: {t:.2f} s per step"
        if a["device_peak_mib"] and b["device_peak_mib"]:
            m = a["device_peak_mib"] + 18 * (b["device_peak_mib"] - a["device_peak_mib"])
            line += f", ~{m:,} MiB of device memory (random weights made on the device)"
        print(line)
