"""Times one FluxPipeline call (CPU, float32, 2 threads) on a pipeline folder, load excluded:
the torch side of `atelier generate` in scripts/bench_side_by_side.sh. Run by hand, never by CI:

    ~/.cache/ref-venv/bin/python tests/reference/bench_pipeline_torch.py /tmp/flux-medium [bf16]

512x512, 4 steps, guidance 0 (schnell), max_sequence_length 256, seed 0; prints the seconds
of the call (text encoders, steps, VAE decode). `bf16` loads every component in bfloat16
(beside `atelier generate --dtype bf16`, whose text encoders and VAE convolutions stay f32).
"""

import sys
import time

import torch
from diffusers import FluxPipeline

torch.set_num_threads(2)
dtype = torch.bfloat16 if sys.argv[2:] == ["bf16"] else torch.float32
pipe = FluxPipeline.from_pretrained(sys.argv[1], torch_dtype=dtype)
args = dict(prompt="a lighthouse at dusk", width=512, height=512, num_inference_steps=4, guidance_scale=0.0,
            max_sequence_length=256, generator=torch.Generator("cpu").manual_seed(0))
t0 = time.perf_counter()
with torch.no_grad():
    pipe(**args)
print(f"seconds per pipeline call: {time.perf_counter() - t0:.3f}")
