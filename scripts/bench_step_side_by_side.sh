#!/usr/bin/env bash
# One transformer step, atelier (flex CPU, f32) and torch + diffusers (CPU, f32, 2 threads),
# alternated ROUNDS times on the same machine so both see the same load; prints each run's
# median and the ratio of the medians of medians. Needs the reference venv (not CI):
#   PYTHON=~/.cache/ref-venv/bin/python ROUNDS=3 scripts/bench_step_side_by_side.sh
# Model: tests/reference/bench_torch.py's medium config (hidden 768, 4 double + 8 single
# blocks, 1024 image + 128 text tokens); atelier benches the same weights (saved once).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
ROUNDS=${ROUNDS:-3}
BIN=${BIN:-target/release/atelier}
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
"$PYTHON" tests/reference/bench_torch.py --runs 1 --warmup 0 --save "$W/medium.safetensors" >/dev/null
for i in $(seq "$ROUNDS"); do
  t=$("$PYTHON" tests/reference/bench_torch.py | sed -n 's/^median seconds per step: //p')
  a=$("$BIN" bench --device cpu --checkpoint "$W/medium.safetensors" --steps 5 2>/dev/null | sed -n 's/^step: median \([0-9.]*\) s.*/\1/p')
  echo "round $i: torch $t s, atelier $a s"
  echo "$t $a" >>"$W/runs"
done
python3 - "$W/runs" <<'PY'
import statistics, sys
rows = [tuple(map(float, l.split())) for l in open(sys.argv[1])]
t = statistics.median(r[0] for r in rows); a = statistics.median(r[1] for r in rows)
print(f"median of medians: torch {t:.3f} s, atelier {a:.3f} s, atelier/torch {a / t:.2f}x")
PY
