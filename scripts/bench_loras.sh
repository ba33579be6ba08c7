#!/usr/bin/env bash
# The LoRA figures of docs/lora.md: step time with 0, 1 and 3 rank-16 LoRAs on the medium
# config (hidden 768, 4 double + 8 single blocks, 1024 image + 128 text tokens, f32, CPU), the
# time to apply and to switch LoRA sets, and the memory they add. Run on a quiet machine:
#   bash scripts/bench_loras.sh [path/to/atelier]
set -euo pipefail
bin="${1:-target/release/atelier}"
for round in 1 2; do
    for n in 0 1 3; do
        echo "== round $round, $n LoRAs"
        "$bin" bench --device cpu --steps 5 --random-loras "$n" --lora-rank 16 2>/dev/null | grep -E '^(config|loras|load|step)'
    done
done
