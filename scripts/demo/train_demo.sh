#!/usr/bin/env bash
# The demo model, trained by atelier itself from the Noto emoji (scripts/demo/emoji_dataset.py):
#   1. the data (npm package emoji-datasource-google 16.0.0, pinned)
#   2. the VAE: `atelier train-vae` from random weights (scripts/demo/vae_config.json), its
#      hold-out set the skin-tone variants
#   3. the transformer: `atelier train --full --init random --train-text-encoders`
#      (scripts/demo/transformer.json, schnell-like), on the VAE's latents, with the text encoders
#      trained from the pipeline fixtures' T5 and a wider CLIP drawn from SEED
#      (scripts/demo/make_clip_encoder.py)
#   4. the VAE fine-tuned whole on the transformer's latent space: `atelier train-vae
#      --keep-latents` (the encoder's latents held near stage 2's, shift and scale kept)
#   5. the dev-like transformer: the same weights with an all-zero guidance embedding
#      (scripts/demo/add_zero_guidance.py), and the two pipeline folders
# Every stage is reproducible from SEED and resumes after an interruption (finished stages are
# skipped; training stages continue from their latest checkpoint). Run it again to resume.
#
#   bash scripts/demo/train_demo.sh [WORK_DIR]     (default target/demo-build)
#
# Tunables (environment): SEED, VAE_STEPS, VAE_FT_STEPS, STEPS, BATCH, LR, PYTHON (one with numpy). The result is in WORK_DIR/out/
# (schnell/ and dev/ pipeline folders); copying it over weights/demo/ is a separate step.
set -euo pipefail
cd "$(dirname "$0")/../.."
W=${1:-target/demo-build}
SEED=${SEED:-1}
VAE_STEPS=${VAE_STEPS:-1000}
VAE_BATCH=${VAE_BATCH:-16}
VAE_FT_STEPS=${VAE_FT_STEPS:-1200}
STEPS=${STEPS:-16000}
BATCH=${BATCH:-32}
LR=${LR:-1e-3}
PYTHON=${PYTHON:-python3}
# The pipeline folder and the transformer's options (scripts/demo/recipe.sh); the CLIP is drawn in
# stage 1.
. scripts/demo/recipe.sh
mkdir -p "$W"
log() { echo "[$(date -u +%H:%M:%S)] $*"; }

cargo build --release --quiet
A=target/release/atelier
if [ -n "${CARGO_TARGET_DIR:-}" ]; then A=$CARGO_TARGET_DIR/release/atelier; fi

# RESUME=(--resume <latest checkpoint of run folder $1>), or () when there is none.
resume_from() {
  local c
  # `|| true`: no checkpoint yet is not an error (set -e with pipefail would stop the script).
  c=$(ls -d "$1"/checkpoints/step_* 2>/dev/null | sort -V | tail -1 || true)
  RESUME=()
  if [ -n "$c" ]; then RESUME=(--resume "$c"); fi
}

log "1/5 data"
if [ ! -f "$W/data/names.tsv" ]; then
  python3 scripts/demo/emoji_dataset.py "$W/data"
fi
"$PYTHON" scripts/demo/make_clip_encoder.py "$W/clip" "$SEED"

log "2/5 VAE ($VAE_STEPS steps of $VAE_BATCH)"
# holdout.json is written last: a VAE folder without it is an interrupted run.
if [ ! -f "$W/vae_train/holdout.json" ]; then
  resume_from "$W/vae_train"
  "$A" train-vae --images "$W/data/train" --holdout "$W/data/holdout" \
    --vae-config scripts/demo/vae_config.json --out "$W/vae" \
    --steps "$VAE_STEPS" --batch "$VAE_BATCH" --lr 1e-3 --warmup-steps 100 --lr-schedule cosine --kl-weight 1e-4 --seed "$SEED" \
    --save-every 250 --save-dtype f16 --device cpu "${RESUME[@]}"
fi
cat "$W/vae_train/holdout.json"

log "3/5 transformer ($STEPS steps of $BATCH)"
# Checkpoints can be measured while the run goes on: scripts/demo/eval_checkpoint.py.
P=$W/pipeline
demo_pipeline "$W" "$P"
if [ ! -f "$W/schnell.safetensors" ]; then
  resume_from "$W/schnell_train"
  "$A" train --model "$P" --images "$W/data/train" "${DEMO_TRANSFORMER_ARGS[@]}" --out "$W/schnell.safetensors" \
    --steps "$STEPS" --batch "$BATCH" --lr "$LR" --warmup-steps 200 --seed "$SEED" --save-every 500 --device cpu \
    --sample-every 1000 --sample-prompt "grinning face" --sample-prompt "red apple" --sample-prompt "cat face" \
    "${RESUME[@]}"
fi

log "4/5 VAE fine-tune on the transformer's latent space ($VAE_FT_STEPS steps of $VAE_BATCH)"
# The whole VAE trains again (1.1–2 s a step on 2 cores; ~27 minutes), its latents held near stage 2's (a drift
# penalty of weight 1: ~0.02 rms in scaled units, the posterior's own spread), so the
# transformer trained on stage 2's latents keeps working while the encoder helps the
# reconstruction too.
if [ ! -f "$W/vae_ft_train/holdout.json" ]; then
  resume_from "$W/vae_ft_train"
  "$A" train-vae --images "$W/data/train" --holdout "$W/data/holdout" --vae "$W/vae" --keep-latents 1 \
    --out "$W/vae_ft" --steps "$VAE_FT_STEPS" --batch "$VAE_BATCH" --lr 3e-4 --warmup-steps 30 --lr-schedule cosine \
    --seed "$SEED" --save-every 200 --save-dtype f16 --device cpu "${RESUME[@]}"
fi
cat "$W/vae_ft_train/holdout.json"

log "5/5 pipeline folders"
python3 scripts/demo/add_zero_guidance.py "$W/schnell.safetensors" "$W/dev.safetensors"
for kind in schnell dev; do
  O=$W/out/$kind
  rm -rf "$O" && mkdir -p "$O/transformer"
  # The trained text encoders (written beside the transformer), the VAE of stage 4.
  cp -r "$W/schnell_text_encoder" "$O/text_encoder"
  cp -r "$W/schnell_text_encoder_2" "$O/text_encoder_2"
  cp -r "$W/vae_ft" "$O/vae"
  cp -r "tests/fixtures/pipeline/$kind/diffusers/scheduler" "tests/fixtures/pipeline/$kind/diffusers/model_index.json" "$O/"
  cp "$W/$kind.safetensors" "$O/transformer/diffusion_pytorch_model.safetensors"
  cp scripts/demo/transformer.json "$O/transformer/config.json"
done
sed -i 's/"guidance_embeds": false/"guidance_embeds": true/' "$W/out/dev/transformer/config.json"
du -sh "$W/out"
log "done: $W/out/{schnell,dev}"
