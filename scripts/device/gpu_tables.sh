#!/usr/bin/env bash
# On a lent GPU machine (the device tool): the benchmark tables issues 14 and 18 ask for, nothing
# else (no demo training), most important first, each bench under its own time limit so one slow
# first compile costs only its own row. The FLUX.1-dev width runs at two depths (1 + 2 and 2 + 4
# blocks) so the per-block time separates from the fixed cost: FLUX.1-dev's 19 + 38 blocks ≈
# t(1+2) + 18 × (t(2+4) − t(1+2)). nvidia-smi samples the card's memory every 200 ms beside
# each bench (peak device memory per row; the bench's own figures are host RSS).
# Prepare with `bash scripts/device/prepare.sh` (no WORK needed for this script), then with carry
# [".dev", ".gl"]:  OUT=$OUT [CUTOFF=480] [BENCHTIME=120] bash scripts/device/gpu_tables.sh
# LOCAL=1 GPUDEV=cpu SMALL=1 checks the flow on this machine (tiny shapes).
# Results: $OUT/tables.jsonl (one JSON object per row: label, command, rc, seconds, peak MiB,
# the bench's JSON), $OUT/log.txt, $OUT/bench_err.txt.
set -uo pipefail
cd "$(dirname "$0")/../.."
. scripts/device/setup.sh
DEV=${GPUDEV:-wgpu}
# Fewer autotune candidates: the first use of each kernel shape is what dominated the H200's
# first calls (2026-12-04); the chosen kernels are still measured, only fewer are tried.
export CUBECL_AUTOTUNE_LEVEL=${CUBECL_AUTOTUNE_LEVEL:-minimal}
SMI=/tmp/smi.csv
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=timestamp,memory.used --format=csv,noheader,nounits -lms 200 >"$SMI" 2>/dev/null &
  SMI_PID=$!
fi
# Peak memory.used (MiB) nvidia-smi saw between two epoch seconds.
peak_mib() {
  [ -s "$SMI" ] || { echo null; return; }
  python3 - "$SMI" "$1" "$2" <<'EOF'
import sys, datetime
path, a, b = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
peak = None
for line in open(path):
    try:
        ts, used = [s.strip() for s in line.split(",")]
        t = datetime.datetime.strptime(ts, "%Y/%m/%d %H:%M:%S.%f").timestamp()
    except ValueError:
        continue
    if a <= t <= b:
        peak = max(peak or 0, int(used))
print("null" if peak is None else peak)
EOF
}
row() { # LABEL bench-options...
  local label=$1; shift
  if [ "$(el)" -gt "${CUTOFF:-480}" ]; then log "skipped (time): $label"; return; fi
  log "bench $label: $*"
  local s=$EPOCHREALTIME
  timeout "${BENCHTIME:-120}" $A bench --device "$DEV" --json "$@" >/tmp/row.json 2>>"$OUT/bench_err.txt"
  local rc=$? e=$EPOCHREALTIME
  python3 - "$label" "$rc" "$s" "$e" "$(peak_mib "$s" "$e")" "$*" >>"$OUT/tables.jsonl" <<'EOF'
import sys, json
label, rc, s, e, peak, cmd = sys.argv[1:]
try:
    bench = json.load(open("/tmp/row.json"))
except Exception:
    bench = None
print(json.dumps({"label": label, "command": "atelier bench " + cmd, "rc": int(rc),
                  "seconds": round(float(e) - float(s), 1),
                  "device_peak_mib": None if peak == "null" else int(peak), "bench": bench}))
EOF
  log "rc=$rc"
}
if [ -n "${SMALL:-}" ]; then
  MED=(--hidden 128 --double-blocks 1 --single-blocks 1 --img-tokens 64 --txt-tokens 16)
  DEV1=(--hidden 256 --double-blocks 1 --single-blocks 2 --img-tokens 64 --txt-tokens 16 --guidance)
  DEV2=(--hidden 256 --double-blocks 2 --single-blocks 4 --img-tokens 64 --txt-tokens 16 --guidance)
  VAE=(--img-tokens 64)
else
  MED=()
  DEV1=(--hidden 3072 --double-blocks 1 --single-blocks 2 --img-tokens 4096 --txt-tokens 512 --guidance)
  DEV2=(--hidden 3072 --double-blocks 2 --single-blocks 4 --img-tokens 4096 --txt-tokens 512 --guidance)
  VAE=()
fi
# Issue 18: the medium config (hidden 768, 4 + 8 blocks, 1024 + 128 tokens), auto dtype (f16) and f32.
row medium-auto "${MED[@]}" --steps 3
row medium-f32 "${MED[@]}" --steps 3 --dtype f32
# Issues 14 and 18: FLUX.1-dev's width at 1024² (4096 + 512 tokens), f16, two depths.
row dev-1+2-f16 "${DEV1[@]}" --steps 2 --dtype f16
row dev-2+4-f16 "${DEV2[@]}" --steps 2 --dtype f16
# Issue 14: kept-packed weights on the GPU (dequantized per layer on the device).
row dev-2+4-q8_0 "${DEV2[@]}" --steps 2 --quant q8_0
row dev-2+4-q4_k "${DEV2[@]}" --steps 2 --quant q4_k
row dev-2+4-q4_0 "${DEV2[@]}" --steps 2 --quant q4_0
row dev-2+4-f32 "${DEV2[@]}" --steps 2 --dtype f32
# The VAE (FLUX.1's architecture) at 512², LoRA training on the medium config.
row vae-512 --vae "${VAE[@]}" --steps 2
row medium-train "${MED[@]}" --train --steps 3
row dev-1+2-train "${DEV1[@]}" --train --steps 2 --dtype f16
[ -n "${SMI_PID:-}" ] && kill "$SMI_PID" 2>/dev/null
if [ -f "$OUT/bench_err.txt" ]; then tail -c 20000 "$OUT/bench_err.txt" >/tmp/be && mv /tmp/be "$OUT/bench_err.txt"; fi
log "end"
