#!/usr/bin/env bash
# Copies a finished recipe run (scripts/demo/train_demo.sh WORK_DIR) over weights/demo/: the
# schnell-like pipeline in full; the dev-like one as its scheduler, model_index.json and a
# sharded transformer whose first shard is a link to schnell's file and whose second holds only
# the zero guidance embedding (scripts/demo/add_zero_guidance.py --shards), with links to
# schnell's VAE and text encoders: every shared weight is stored once.
#
#   bash scripts/demo/install_demo.sh WORK_DIR
set -euo pipefail
cd "$(dirname "$0")/../.."
W=${1:?usage: install_demo.sh WORK_DIR}
for kind in schnell dev; do
  [ -f "$W/out/$kind/transformer/diffusion_pytorch_model.safetensors" ] || { echo "$W/out/$kind is not finished" >&2; exit 1; }
done
rm -rf weights/demo/schnell weights/demo/dev
mkdir -p weights/demo/schnell weights/demo/dev/transformer
cp -r "$W/out/schnell/." weights/demo/schnell/
cp -r "$W/out/dev/scheduler" "$W/out/dev/model_index.json" weights/demo/dev/
cp "$W/out/dev/transformer/config.json" weights/demo/dev/transformer/
python3 scripts/demo/add_zero_guidance.py --shards weights/demo/schnell/transformer/diffusion_pytorch_model.safetensors \
  weights/demo/dev/transformer
ln -s ../../schnell/transformer/diffusion_pytorch_model.safetensors \
  weights/demo/dev/transformer/diffusion_pytorch_model-00001-of-00002.safetensors
for part in vae text_encoder text_encoder_2; do
  ln -s "../schnell/$part" "weights/demo/dev/$part"
done
du -shL weights/demo/schnell weights/demo/dev
du -sh weights/demo
