#!/usr/bin/env bash
# Packs what scripts/device/gpu_check.sh needs on a lent GPU machine (no Rust, no network there)
# into .dev/ and .gl/ (both in .git/info/exclude; carry them: the working tree travels up to 64 MiB):
#   .dev/atelier.xz     the release binary, stripped and xz'd (117 MB → 15 MB)
#   .dev/train.tar.xz   the demo's training images (WORK/data/train, 17 MB → 6 MB)
#   .dev/pipeline/      the demo pipeline (WORK's CLIP and VAE, the fixtures' T5 and scheduler)
#   .gl/*.deb           the Vulkan loader AND glvnd: NVIDIA's Vulkan ICD is libGLX_nvidia.so.0,
#                       which finds no adapter without libGLdispatch (libglvnd0) — seen on the H200
#
#   bash scripts/device/prepare.sh [WORK]   (WORK: a train_demo.sh folder with data/, clip/, vae/;
#                                           without it only the binary and .gl: gpu_tables.sh)
set -euo pipefail
cd "$(dirname "$0")/../.."
W=${1:-}
T=${CARGO_TARGET_DIR:-target}
for d in /.dev/ /.gl/; do grep -qx "$d" .git/info/exclude 2>/dev/null || echo "$d" >>.git/info/exclude; done
rm -rf .dev && mkdir -p .dev .gl /tmp/amd64/partial
strip -o /tmp/atelier.stripped "$T/release/atelier"
xz -T0 -6 -c /tmp/atelier.stripped >.dev/atelier.xz
if [ -n "$W" ]; then
  (cd "$W/data" && tar cf - train | xz -T0 -9 >"$OLDPWD/.dev/train.tar.xz")
  . scripts/demo/recipe.sh
  demo_pipeline "$W" .dev/pipeline
fi
o='-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64'
apt-get $o update >/dev/null
(cd .gl && apt-get $o download libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2)
du -sh .dev .gl
