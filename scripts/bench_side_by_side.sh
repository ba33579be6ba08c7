#!/usr/bin/env bash
# atelier (flex CPU, f32) and torch + diffusers (CPU, f32, 2 threads) alternated ROUNDS times on
# the same machine, so both see the same load; prints each round and the ratio of the medians.
# Needs the reference venv (not CI):
#   PYTHON=~/.cache/ref-venv/bin/python ROUNDS=3 STAGES="step vae generate" scripts/bench_side_by_side.sh
# step: one transformer step, tests/reference/bench_torch.py's medium config (hidden 768,
#   4 double + 8 single blocks, 1024 image + 128 text tokens) with the same weights both sides.
# vae: FLUX.1's VAE (real architecture, random weights), decode and encode at 512x512.
# generate: `atelier generate` as a process (load included) against one FluxPipeline call (load
#   excluded) on tests/reference/make_medium_pipeline.py's folder, 512x512, 4 steps.
# train256, train512: a LoRA training step (rank 16 on every block Linear; forward, backward,
#   AdamW) on the medium config at 256x256 (256 image tokens) or 512x512 (1024), 128 text
#   tokens: `atelier bench --train` against tests/reference/bench_train_torch.py (torch + peft),
#   one graph over the model (-plain) and per-block recompute against torch's gradient
#   checkpointing (-recompute).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
ROUNDS=${ROUNDS:-3}
STAGES=${STAGES:-step vae generate}
BIN=${BIN:-target/release/atelier}
PIPELINE=${PIPELINE:-/tmp/flux-medium}
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
quiet() { "$@" 2>/dev/null; }
# One measurement: stage, torch seconds, atelier seconds.
rec() { echo "$*" >>"$W/runs"; echo "round $i: $1 torch $2 s, atelier $3 s"; }
for stage in $STAGES; do
  case $stage in
    step) "$PYTHON" tests/reference/bench_torch.py --runs 1 --warmup 0 --save "$W/medium.safetensors" >/dev/null 2>&1 ;;
    generate) [ -d "$PIPELINE" ] || "$PYTHON" tests/reference/make_medium_pipeline.py "$PIPELINE" >/dev/null 2>&1 ;;
  esac
done
for i in $(seq "$ROUNDS"); do
  for stage in $STAGES; do
    case $stage in
      step)
        t=$(quiet "$PYTHON" tests/reference/bench_torch.py | sed -n 's/^median seconds per step: //p')
        a=$(quiet "$BIN" bench --device cpu --checkpoint "$W/medium.safetensors" --steps 5 | sed -n 's/^step: median \([0-9.]*\) s.*/\1/p')
        rec step "$t" "$a" ;;
      vae)
        out=$(quiet "$PYTHON" tests/reference/bench_torch.py --vae --runs 2 --warmup 1)
        ours=$(quiet "$BIN" bench --device cpu --vae --steps 2)
        rec vae-decode "$(sed -n 's/^median seconds per decode: //p' <<<"$out")" "$(sed -n 's/^vae decode: median \([0-9.]*\) s.*/\1/p' <<<"$ours")"
        rec vae-encode "$(sed -n 's/^median seconds per encode: //p' <<<"$out")" "$(sed -n 's/^vae encode: median \([0-9.]*\) s.*/\1/p' <<<"$ours")" ;;
      generate)
        t=$(quiet "$PYTHON" tests/reference/bench_pipeline_torch.py "$PIPELINE" | sed -n 's/^seconds per pipeline call: //p')
        s=$(date +%s.%N)
        quiet "$BIN" generate --device cpu --model "$PIPELINE" --prompt "a lighthouse at dusk" --width 512 --height 512 \
          --steps 4 --max-sequence-length 256 --out "$W/out.png" >/dev/null
        a=$(python3 -c "import time; print(f'{time.time() - $s:.3f}')")
        rec generate "$t" "$a" ;;
      train256 | train512)
        if [ "$stage" = train256 ]; then grid="16 16" tokens=256; else grid="32 32" tokens=1024; fi
        for mode in plain recompute; do
          if [ "$mode" = plain ]; then ckpt=() ours=(--no-recompute); else ckpt=(--checkpointing) ours=(); fi
          # shellcheck disable=SC2086
          t=$(quiet "$PYTHON" tests/reference/bench_train_torch.py --grid $grid --warmup 1 --runs 3 "${ckpt[@]}" |
            sed -n 's/^median seconds per training step: //p')
          a=$(quiet "$BIN" bench --device cpu --train "${ours[@]}" --img-tokens "$tokens" --txt-tokens 128 --steps 3 |
            sed -n 's/^step: median \([0-9.]*\) s.*/\1/p')
          rec "$stage-$mode" "$t" "$a"
        done ;;
    esac
  done
done
python3 - "$W/runs" <<'PY'
import collections, statistics, sys
runs = collections.defaultdict(list)
for line in open(sys.argv[1]):
    stage, t, a = line.split()
    runs[stage].append((float(t), float(a)))
for stage, rows in runs.items():
    t = statistics.median(r[0] for r in rows); a = statistics.median(r[1] for r in rows)
    print(f"{stage:<18} torch {t:7.3f} s   atelier {a:7.3f} s   atelier/torch {a / t:.2f}x   ({len(rows)} rounds)")
PY
