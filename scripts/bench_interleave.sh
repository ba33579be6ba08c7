#!/usr/bin/env bash
# How long an image job waits behind a running LoRA training, and how much the training slows
# down, with `[queue] training_share = 0` (images first, the training yields at every step
# boundary). For the tiny demo model and a "medium" one (the demo pipeline with a random
# transformer of the bench's medium size: hidden 768, 4 double + 8 single blocks), on the CPU:
#   bash scripts/bench_interleave.sh [path/to/atelier]
# Needs python3; the medium transformer is written with torch + diffusers from
# $REF_PYTHON (default ~/.cache/ref-venv/bin/python). Prints one line per measurement.
set -euo pipefail
bin="$(realpath "${1:-target/release/atelier}")"
ref_python="${REF_PYTHON:-$HOME/.cache/ref-venv/bin/python}"
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

# The medium pipeline: the demo's VAE and text encoders, a random medium transformer.
cp -r "$repo/weights/demo/schnell" "$work/medium"
rm -rf "$work/medium/transformer"
"$ref_python" - "$work/medium/transformer" <<'EOF'
import sys, torch
from diffusers import FluxTransformer2DModel
torch.manual_seed(0)
m = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=4, num_single_layers=8, attention_head_dim=128,
                           num_attention_heads=6, joint_attention_dim=8, pooled_projection_dim=4,
                           guidance_embeds=False, axes_dims_rope=(16, 56, 56))
m.save_pretrained(sys.argv[1])
EOF

sed -e 's/preview_every = 1/preview_every = 0/' \
    -e 's/resolutions = \[256, 512, 768, 1024\]/resolutions = [32, 64, 128, 256, 512]/' \
    -e 's/sample_every = 250/sample_every = 0\nmax_sequence_length = 32/' \
    -e 's/checkpoint_every_steps = 100/checkpoint_every_steps = 0/' \
    "$repo/config.toml" > "$work/config.toml"
data="$work/data"
for u in trainer painter; do
    printf 'pw-%s-123\n' "$u" | "$bin" --data "$data" --config "$work/config.toml" user add "$u" --password-stdin >/dev/null
    "$bin" --data "$data" --config "$work/config.toml" user set-plan "$u" max --weekly >/dev/null
done
cd "$repo"
"$bin" --data "$data" --config "$work/config.toml" serve --device cpu --listen 127.0.0.1:0 \
    --model "tiny=$repo/weights/demo/schnell" --model "medium=$work/medium" > "$work/stdout" 2> "$work/server.log" &
for _ in $(seq 1 600); do grep -q '^listening on ' "$work/stdout" && break; sleep 0.2; done
url="$(sed -n 's/^listening on //p' "$work/stdout" | head -1)"

python3 - "$url" "$data" <<'EOF'
import json, os, sys, threading, time, urllib.request, uuid
url, data = sys.argv[1], sys.argv[2]

class Client:
    def __init__(self, name):
        r = self.call("POST", "/api/login", {"name": name, "password": f"pw-{name}-123"}, raw=True)
        self.cookie = r.headers["set-cookie"].split(";")[0]
        self.csrf = json.loads(r.read())["csrf_token"]
    def call(self, method, path, body=None, raw=False):
        req = urllib.request.Request(url + path, method=method, data=json.dumps(body).encode() if body is not None else None)
        req.add_header("Content-Type", "application/json")
        if hasattr(self, "cookie"):
            req.add_header("Cookie", self.cookie); req.add_header("X-CSRF-Token", self.csrf)
        r = urllib.request.urlopen(req, timeout=3600)
        return r if raw else json.loads(r.read())
    def events(self, job, until):
        """Yields (time, event) of job's SSE stream until `until(event)`."""
        req = urllib.request.Request(f"{url}/api/jobs/{job}/events")
        req.add_header("Cookie", self.cookie)
        with urllib.request.urlopen(req, timeout=3600) as r:
            for line in r:
                line = line.decode().strip()
                if line.startswith("data: "):
                    e = json.loads(line[6:])
                    yield time.monotonic(), e
                    if until(e):
                        return

final = lambda e: e["type"] in ("succeeded", "trained", "failed", "canceled")
trainer, painter = Client("trainer"), Client("painter")

def dataset(owner, n, side):
    ds = uuid.uuid4().hex
    d = os.path.join(data, "datasets", ds)
    os.makedirs(os.path.join(d, "images"))
    json.dump({"id": ds, "owner": owner, "name": "bench", "trigger": "zqx", "created_at": "2026-01-01T00:00:00Z"},
              open(os.path.join(d, "dataset.json"), "w"))
    import struct, zlib
    for i in range(n):  # plain striped PNGs
        rows = b"".join(b"\0" + b"".join((b"\xdc\x14\x14" if (x + i) % 8 == y % 8 else b"\xfa\xfa\xfa") for x in range(side)) for y in range(side))
        chunk = lambda t, b: struct.pack(">I", len(b)) + t + b + struct.pack(">I", zlib.crc32(t + b))
        png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
        open(os.path.join(d, "images", f"{i}.png"), "wb").write(png)
    return ds

def image_job(model, size, steps):
    """Runs one image job; returns (submitted, started, done) monotonic times."""
    t0 = time.monotonic()
    job = painter.call("POST", "/api/jobs", {"model": model, "prompt": "a fox", "width": size, "height": size, "steps": steps, "seed": 1})["job"]
    started = done = None
    for t, e in painter.events(job["id"], final):
        if e["type"] == "started" and started is None:
            started = t
        if final(e):
            done = t
    return t0, started, done

def train(model, ds, steps, res, rank, during=None):
    """Trains; returns (first step, end) monotonic times. `during(stop)` runs in a thread once it steps."""
    name = f"b{uuid.uuid4().hex[:8]}"
    job = trainer.call("POST", "/api/trainings", {"dataset": ds, "model": model, "name": name, "steps": steps, "rank": rank, "resolution": res, "seed": 1})["job"]
    first = end = None; stop = threading.Event(); th = None
    for t, e in trainer.events(job["id"], final):
        if e["type"] == "training_step" and first is None:
            first = t
            if during:
                th = threading.Thread(target=during, args=(stop,)); th.start()
        if final(e):
            end = t; assert e["type"] == "trained", e
    stop.set()
    if th: th.join()
    return first, end

owner = trainer.call("GET", "/api/session")["user"]["id"]
for model, res, tsteps, isize, isteps, rounds in [("tiny", 32, 300, 64, 4, 3), ("medium", 256, 12, 512, 4, 3)]:
    ds = dataset(owner, 4, res)
    image_job(model, isize, isteps)  # warm-up (loads, kernels)
    alone = [image_job(model, isize, isteps) for _ in range(rounds)]
    a0, a1 = train(model, ds, tsteps, res, 8)
    t_alone = a1 - a0
    runs = []
    def painter_loop(stop):
        while not stop.is_set():
            runs.append(image_job(model, isize, isteps))
            time.sleep(0.05)
    first, end = train(model, ds, tsteps, res, 8, painter_loop)
    t_inter = end - first
    during = [r for r in runs if r[1] < end]
    # The device time the images took inside the training's run.
    overlap = sum(max(0.0, min(d, end) - max(s, first)) for _, s, d in during)
    mean = lambda xs: sum(xs) / max(len(xs), 1)
    waits = [s - t for t, s, _ in during]
    print(f"{model}: image {isize}x{isize} {isteps} steps alone: wait {mean([s - t for t, s, _ in alone]):.3f}s, run {mean([d - s for _, s, d in alone]):.3f}s")
    print(f"{model}: training {tsteps} steps at {res}x{res} rank 8 alone: {t_alone:.2f}s ({t_alone / tsteps:.3f}s/step)")
    print(f"{model}: {len(during)} image jobs submitted back to back during a training: wait mean {mean(waits):.3f}s max {max(waits or [0]):.3f}s, run mean {mean([d - s for _, s, d in during]):.3f}s")
    print(f"{model}: training with them: {t_inter:.2f}s wall ({t_inter / t_alone:.2f}x); without the images' own time {t_inter - overlap:.2f}s ({(t_inter - overlap) / t_alone:.2f}x alone)")
EOF
