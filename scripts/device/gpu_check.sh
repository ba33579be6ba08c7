#!/usr/bin/env bash
# On a lent GPU machine (the device tool): Vulkan set-up, the demo transformer trained on the GPU
# (a 40-step probe sizes the run to BUDGET seconds), the fixture pipeline generated in f32 and
# auto dtype (compare with the CPU here), then GPU benchmarks while time is left: none starts
# after CUTOFF seconds, so with BENCHTIME the call ends inside the device tool's 600 s.
# Prepare with scripts/device/prepare.sh, then run it with carry [".dev", ".gl"]:
#   OUT=$OUT [NOCPU=1] [BUDGET=270] [CUTOFF=500] [BENCHTIME=90] [BATCH=1024] [LR=2e-3] bash scripts/device/gpu_check.sh
# LOCAL=1 GPUDEV=cpu BATCH=32 BUDGET=60 GENTIME=5 checks the flow on this machine.
set -uo pipefail
cd "$(dirname "$0")/../.."
. scripts/demo/recipe.sh
. scripts/device/setup.sh
cat "${VK_DRIVER_FILES:-/dev/null}" >>"$OUT/log.txt"

# 2. The demo transformer (its log stamped with the wall clock).
train() { # LIMIT_S DEVICE BATCH STEPS OUT LOGFILE
  local warm=$(( $4 / 10 < 200 ? $4 / 10 : 200 ))
  timeout "$1" $A train --model .dev/pipeline --images /tmp/data/train "${DEMO_TRANSFORMER_ARGS[@]}" \
    --out "$5" --steps "$4" --batch "$3" --lr "$LR" --warmup-steps $warm --seed 1 --save-every "$4" --device "$2" 2>&1 | stamped >"$6"
}
# P="seconds per step between steps 10 and 40, seconds from start to step 1", or "fail".
probe() { # DEVICE BATCH
  local s=$EPOCHREALTIME
  train 200 "$1" "$2" 40 /tmp/probe.safetensors /tmp/probe.log
  P=$(awk -v s="$s" '/ step 1\//{first=$1-s} / step 10\//{a=$1} / step 40\//{b=$1}
    END{if(b>0) printf "%.5f %.1f\n",(b-a)/30,first; else print "fail"}' /tmp/probe.log)
  log "$1 probe (batch $2): $P"
}
DEV=${GPUDEV:-wgpu}; BATCH=${BATCH:-1024}; LR=${LR:-2e-3}
probe "$DEV" "$BATCH"
if [ "$P" = fail ] && [ -z "${NOCPU:-}" ]; then
  tail -20 /tmp/probe.log >>"$OUT/log.txt"
  DEV=cpu; BATCH=128
  probe "$DEV" "$BATCH"
fi
if [ "$P" != fail ]; then
  read PER START <<<"$P"
  BUDGET=${BUDGET:-270}
  STEPS=$(python3 -c "print(max(200, min(30000, int(($BUDGET - $START - 15) / $PER))))")
  log "main run: $DEV batch $BATCH lr $LR steps $STEPS (per step ${PER}s, start ${START}s)"
  S=$EPOCHREALTIME
  train $(( BUDGET + 60 )) "$DEV" "$BATCH" "$STEPS" /tmp/demo.safetensors /tmp/main.log
  log "main run rc=$? in $(python3 -c "print(round($EPOCHREALTIME-$S))") s"
  cp /tmp/demo.safetensors /tmp/demo_train/loss.csv "$OUT/" 2>/dev/null
  summarize /tmp/main.log 50 >"$OUT/main_log.txt"
fi
cat /tmp/probe.log >>"$OUT/main_log.txt"

# 3. wgpu on real Vulkan: the fixture pipeline, f32 and auto dtype (compared with the CPU here later).
for dt in f32 auto; do
  timeout "${GENTIME:-45}" $A generate --model tests/fixtures/pipeline/schnell/diffusers --prompt "a red apple" --seed 1 \
    --steps 4 --width 64 --height 64 --device wgpu --dtype $dt --out "$OUT/fixture_$dt.png" >>"$OUT/log.txt" 2>&1
  log "generate $dt rc=$?"
done

# 4. GPU benchmarks, while time is left.
bench() {
  if [ -n "${LOCAL:-}" ] || [ "$(el)" -gt "${CUTOFF:-500}" ]; then log "skipped (time): bench $*"; return; fi
  log "bench $*"
  timeout "${BENCHTIME:-90}" $A bench --device wgpu --json "$@" >>"$OUT/bench.txt" 2>>"$OUT/bench_err.txt"
  log "rc=$?"
}
bench --steps 3
bench --steps 3 --dtype f32
bench --hidden 3072 --double-blocks 1 --single-blocks 2 --img-tokens 4096 --txt-tokens 512 --guidance --steps 3
bench --train --steps 3
bench --vae --steps 2
bench --quant q8_0 --steps 3
if [ -f "$OUT/bench_err.txt" ]; then tail -c 20000 "$OUT/bench_err.txt" >/tmp/be && mv /tmp/be "$OUT/bench_err.txt"; fi
log "end"
