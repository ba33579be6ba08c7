#!/usr/bin/env bash
# On a lent GPU machine (the device tool): Vulkan set-up, the demo transformer trained on the GPU
# (a 40-step probe sizes the run to BUDGET seconds), the fixture pipeline generated in f32 and
# auto dtype (compare with the CPU here), then GPU benchmarks while time is left (CUTOFF).
# Prepare with scripts/device/prepare.sh, then run it with carry [".dev", ".gl"]:
#   OUT=$OUT [NOCPU=1] [BUDGET=270] [CUTOFF=525] [BENCHTIME=90] [BATCH=1024] [LR=2e-3] bash scripts/device/gpu_check.sh
# LOCAL=1 GPUDEV=cpu BATCH=32 BUDGET=60 GENTIME=5 checks the flow on this machine.
set -uo pipefail
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
log() { echo "[$(el)s] $*" | tee -a $OUT/log.txt; }
if [ -z "${LOCAL:-}" ]; then for f in .gl/*.deb; do dpkg -x $f /; done; ldconfig; fi
for j in /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json /usr/share/vulkan/icd.d/nvidia_icd.json /etc/vulkan/icd.d/nvidia_icd.json; do
  if [ -f $j ]; then export VK_DRIVER_FILES=$j; break; fi
done
export __EGL_VENDOR_LIBRARY_FILENAMES=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json
log "icd: ${VK_DRIVER_FILES:-none}; $(nvidia-smi 2>/dev/null --query-gpu=name,driver_version,memory.total --format=csv,noheader)"
xz -dc .dev/atelier.xz > /tmp/atelier && chmod +x /tmp/atelier
A=/tmp/atelier
mkdir -p /tmp/data && tar xJf .dev/train.tar.xz -C /tmp/data
ls /usr/local/nvidia/lib* >>$OUT/log.txt 2>&1; cat ${VK_DRIVER_FILES:-/dev/null} >>$OUT/log.txt; log "setup done: $(ls /tmp/data/train | wc -l) files"

# 2. The demo transformer. stamp: prefix each stderr line with the wall clock.
stamp() { while IFS= read -r l; do printf '%s %s\n' "$EPOCHREALTIME" "$l"; done; }
train() { # DEVICE BATCH STEPS OUT LOGFILE
  local warm=$(( $3 / 10 < 200 ? $3 / 10 : 200 ))
  $A train --model .dev/pipeline --images /tmp/data/train --max-images 5000 --full --init random \
    --transformer-config scripts/demo/transformer.json --out "$4" --steps "$3" --batch "$2" --lr "$LR" \
    --warmup-steps $warm --lr-schedule cosine --resolution 64 --max-sequence-length 8 --caption-dropout 0 \
    --seed 1 --save-every "$3" --save-dtype f16 --device "$1" 2>&1 | grep --line-buffered -v "T5 tokens" | stamp > "$5"
}
# seconds per step between steps 10 and 40 of a probe log, and seconds from start to step 1
probe() { # LOG START
  awk -v s="$2" '/ step 1\//{first=$1-s} / step 10\//{a=$1} / step 40\//{b=$1} END{if(b>0) printf "%.5f %.1f\n",(b-a)/30,first; else print "fail"}' "$1"
}
DEV=${GPUDEV:-wgpu}; BATCH=${BATCH:-1024}; LR=${LR:-2e-3}
S=$EPOCHREALTIME; timeout 200 bash -c "$(declare -f train stamp); A=$A LR=$LR; train $DEV $BATCH 40 /tmp/probe.safetensors /tmp/probe.log"
P=$(probe /tmp/probe.log $S); log "gpu probe (batch $BATCH): $P"
if [ "$P" = fail ] && [ -z "${NOCPU:-}" ]; then
  tail -20 /tmp/probe.log >> $OUT/log.txt
  DEV=cpu; BATCH=128; S=$EPOCHREALTIME
  timeout 200 bash -c "$(declare -f train stamp); A=$A LR=$LR; train cpu $BATCH 40 /tmp/probe.safetensors /tmp/probe.log"
  P=$(probe /tmp/probe.log $S); log "cpu probe (batch $BATCH): $P"
fi
if [ "$P" != fail ]; then
  read PER START <<<"$P"
  BUDGET=${BUDGET:-270}
  STEPS=$(python3 -c "print(max(200, min(30000, int(($BUDGET - $START - 15) / $PER))))")
  log "main run: $DEV batch $BATCH lr $LR steps $STEPS (per step ${PER}s, start ${START}s)"
  S=$EPOCHREALTIME
  timeout $(( BUDGET + 60 )) bash -c "$(declare -f train stamp); A=$A LR=$LR; train $DEV $BATCH $STEPS /tmp/demo.safetensors /tmp/main.log"
  log "main run rc=$? in $(python3 -c "print(round($EPOCHREALTIME-$S))") s"
  cp /tmp/demo.safetensors $OUT/ 2>/dev/null; cp /tmp/demo_train/loss.csv $OUT/ 2>/dev/null
  grep -v " step " /tmp/main.log > $OUT/main_log.txt; grep " step " /tmp/main.log | awk 'NR%50==1' >> $OUT/main_log.txt; tail -3 /tmp/main.log >> $OUT/main_log.txt
fi
cat /tmp/probe.log >> $OUT/main_log.txt

# 1. wgpu on real Vulkan: the fixture pipeline, f32 and auto dtype (compared with the CPU here later).
for dt in f32 auto; do
  timeout ${GENTIME:-45} $A generate --model tests/fixtures/pipeline/schnell/diffusers --prompt "a red apple" --seed 1 \
    --steps 4 --width 64 --height 64 --device wgpu --dtype $dt --out $OUT/fixture_$dt.png >>$OUT/log.txt 2>&1
  log "generate $dt rc=$?"
done

# 3. GPU benchmarks, while time is left.
bench() { if [ -n "${LOCAL:-}" ] || [ $(el) -gt ${CUTOFF:-525} ]; then log "skipped (time): bench $*"; return; fi
  log "bench $*"; timeout ${BENCHTIME:-90} $A bench --device wgpu --json "$@" >>$OUT/bench.txt 2>>$OUT/bench_err.txt; log "rc=$?"; }
bench --steps 3
bench --steps 3 --dtype f32
bench --hidden 3072 --double-blocks 1 --single-blocks 2 --img-tokens 4096 --txt-tokens 512 --guidance --steps 3
bench --train --steps 3
bench --vae --steps 2
bench --quant q8_0 --steps 3
tail -c 20000 $OUT/bench_err.txt > /tmp/be; mv /tmp/be $OUT/bench_err.txt
log "end"
