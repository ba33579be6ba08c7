#!/usr/bin/env bash
# On a lent GPU machine (the device tool): continues the demo model's training — transformer and
# text encoders together, as scripts/demo/recipe.sh trains them — from the shipped
# weights/demo/schnell, on wgpu (an H200 ran it ~17× faster than 2 CPU cores, after ~175 s of
# start-up). The cosine schedule spans STEPS; the run stops at LIMIT seconds whatever it reached,
# and then the latest checkpoint comes back instead (split into 15 MB parts: the tool returns
# files of 16 MB at most).
# If the joint run fails before its first step, the transformer trains alone on the trained
# (frozen) encoders, the path gpu_check.sh ran on the H200. GPU benchmarks follow while time is
# left (none starts after CUTOFF seconds).
#   bash scripts/device/prepare.sh WORK; rm -rf .dev/pipeline   (the tree travels up to 64 MiB), then
#   with carry [".dev", ".gl"]: OUT=$OUT [STEPS=800] [LIMIT=430] [BATCH=1024] [LR=1e-3] bash scripts/device/continue_demo.sh
# LOCAL=1 GPUDEV=cpu BATCH=16 STEPS=6 LIMIT=300 checks the flow on this machine.
# Back here: in a train_demo.sh folder WORK (its data and stage-2 VAE the shipped model's: the VAE
# before stage 4's fine-tune, which would otherwise drift a second time), the files of $OUT become
# WORK/schnell.safetensors and schnell_text_encoder*/ (eval_checkpoint.py measures them), then
# train_demo.sh WORK runs stages 4 and 5 and install_demo.sh WORK ships it.
set -uo pipefail
cd "$(dirname "$0")/../.."
. scripts/demo/recipe.sh
. scripts/device/setup.sh
DEV=${GPUDEV:-wgpu}; BATCH=${BATCH:-1024}; STEPS=${STEPS:-800}; LR=${LR:-1e-3}; LIMIT=${LIMIT:-430}
# The recipe's options without the random init (this run starts from the shipped transformer).
ARGS=()
set -- "${DEMO_TRANSFORMER_ARGS[@]}"
while [ $# -gt 0 ]; do
  case $1 in --init | --transformer-config) shift 2 ;; *) ARGS+=("$1"); shift ;; esac
done
R=/tmp/run
train() { # LIMIT_S LOGFILE [extra options]
  local limit=$1 logf=$2; shift 2
  rm -rf $R && mkdir -p $R
  timeout "$limit" $A train --model weights/demo/schnell --images /tmp/data/train "${ARGS[@]}" "$@" \
    --dtype f32 --out $R/demo.safetensors --steps "$STEPS" --batch "$BATCH" --lr "$LR" --warmup-steps $(( STEPS / 20 )) \
    --seed 1 --save-every $(( STEPS / 8 )) --device "$DEV" 2>&1 | stamped >"$logf"
}
log "joint run: $DEV batch $BATCH lr $LR steps $STEPS, at most $LIMIT s"
train "$LIMIT" /tmp/main.log
if ! grep -q " step 1/" /tmp/main.log; then
  log "the joint run made no step:"; tail -15 /tmp/main.log >>"$OUT/log.txt"
  mv /tmp/main.log /tmp/joint.log
  set -- "${ARGS[@]}"; ARGS=()
  for a in "$@"; do [ "$a" = --train-text-encoders ] || ARGS+=("$a"); done
  log "transformer-only run on the trained encoders, at most $(( LIMIT - $(el) + 30 )) s"
  train $(( LIMIT - $(el) + 30 )) /tmp/main.log
  cat /tmp/joint.log >>"$OUT/log.txt"
fi
summarize /tmp/main.log 25 >"$OUT/main_log.txt"
cp $R/demo_train/loss.csv "$OUT/" 2>/dev/null
if [ -f $R/demo.safetensors ]; then
  cp -r $R/demo.safetensors $R/demo_text_encoder $R/demo_text_encoder_2 "$OUT/" 2>/dev/null
  log "finished: $(ls $R)"
else
  c=$(ls -d $R/demo_train/checkpoints/step_* 2>/dev/null | sort -V | tail -1)
  log "not finished (limit or error); latest checkpoint: ${c:-none}"
  if [ -n "$c" ]; then mkdir -p "$OUT/ckpt" && split -b 15M "$c/state.safetensors" "$OUT/ckpt/$(basename "$c")."; fi
fi

# GPU benchmarks while time is left (issue 15: a training step on the GPU); JSON into log.txt.
for b in "--train --steps 3"; do
  if [ -n "${LOCAL:-}" ] || [ "$(el)" -gt "${CUTOFF:-470}" ]; then log "skipped (time): bench $b"; continue; fi
  log "bench $b"
  timeout "${BENCHTIME:-100}" $A bench --device wgpu --json $b >>"$OUT/log.txt" 2>/tmp/bench_err.txt
  log "rc=$?"; tail -5 /tmp/bench_err.txt >>"$OUT/log.txt"
done
log "end"
