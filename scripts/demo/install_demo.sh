#!/usr/bin/env bash
# Copies a finished recipe run (scripts/demo/train_demo.sh WORK_DIR) over weights/demo/: the
# schnell-like pipeline in full, the dev-like one as its own transformer, scheduler and
# model_index.json with links to schnell's VAE and text encoders (one copy of the shared parts).
#
#   bash scripts/demo/install_demo.sh WORK_DIR
set -euo pipefail
cd "$(dirname "$0")/../.."
W=${1:?usage: install_demo.sh WORK_DIR}
for kind in schnell dev; do
  [ -f "$W/out/$kind/transformer/diffusion_pytorch_model.safetensors" ] || { echo "$W/out/$kind is not finished" >&2; exit 1; }
done
for kind in schnell dev; do
  rm -rf "weights/demo/$kind"
  mkdir -p "weights/demo/$kind"
  cp -r "$W/out/$kind/transformer" "$W/out/$kind/scheduler" "$W/out/$kind/model_index.json" "weights/demo/$kind/"
done
cp -r "$W/out/schnell/vae" "$W/out/schnell/text_encoder" "$W/out/schnell/text_encoder_2" weights/demo/schnell/
for part in vae text_encoder text_encoder_2; do
  ln -s "../schnell/$part" "weights/demo/dev/$part"
done
du -shL weights/demo/schnell weights/demo/dev
du -sh weights/demo
