# Sourced by the scripts/device/ checks on a lent GPU machine (no Rust, no network there): Vulkan
# (NVIDIA's ICD is libGLX_nvidia.so.0, which needs glvnd beside the loader: .gl/, packed by
# prepare.sh), the release binary as $A and the demo's training images under /tmp/data/train.
# Defines el (seconds since sourcing), log (to stdout and $OUT/log.txt), stamped and
# summarize (below). LOCAL=1: this machine.
: "${OUT:?set OUT to the folder the results go to}"
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
log() { echo "[$(el)s] $*" | tee -a "$OUT/log.txt"; }
if [ -z "${LOCAL:-}" ]; then for f in .gl/*.deb; do dpkg -x "$f" /; done; ldconfig; fi
for j in /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json /usr/share/vulkan/icd.d/nvidia_icd.json /etc/vulkan/icd.d/nvidia_icd.json; do
  if [ -f $j ]; then export VK_DRIVER_FILES=$j; break; fi
done
export __EGL_VENDOR_LIBRARY_FILENAMES=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json
log "icd: ${VK_DRIVER_FILES:-none}; $(nvidia-smi 2>/dev/null --query-gpu=name,driver_version,memory.total --format=csv,noheader)"
A=/tmp/atelier
xz -dc .dev/atelier.xz >$A && chmod +x $A
if [ -f .dev/train.tar.xz ]; then
  mkdir -p /tmp/data && tar xJf .dev/train.tar.xz -C /tmp/data
  log "setup done: $(ls /tmp/data/train | wc -l) files"
else
  log "setup done (no training images packed)"
fi

# A training run's output with each line prefixed by the wall clock, the per-caption "T5 tokens"
# warnings dropped.
stamped() { grep --line-buffered -v "T5 tokens" | while IFS= read -r l; do printf '%s %s\n' "$EPOCHREALTIME" "$l"; done; }
# summarize LOG EVERY: LOG's other lines, every EVERY-th step line and the last three.
summarize() { grep -v " step " "$1"; grep " step " "$1" | awk -v n="$2" 'NR%n==1'; grep " step " "$1" | tail -3; }
