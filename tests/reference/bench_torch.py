"""Times one forward of a mid-size FLUX transformer in torch (CPU, float32), the
baseline the Rust engine is compared against. Run by hand, never by CI:

    nice -n 10 /work/venv-ref/bin/python tests/reference/bench_torch.py
    nice -n 10 /work/venv-ref/bin/python tests/reference/bench_torch.py --save /tmp/bench_bfl.safetensors
    /work/venv-ref/bin/python tests/reference/bench_torch.py --quick      # tiny config, smoke test

Model (full run): FluxTransformer2DModel, hidden 768 (6 heads x 128, RoPE axes 16/56/56),
4 double + 8 single blocks, in_channels 64, joint_attention_dim 4096, pooled 768,
no guidance embedding; batch 1, 1024 image tokens (32 x 32 packed grid) + 128 text tokens;
torch.set_num_threads(2), no_grad; 2 warm-up + 5 timed forwards. Prints the median
seconds per forward (= per sampling step) and the torch version.

--vae times the FLUX VAE instead (AutoencoderKL with FLUX.1's real architecture: ch 128,
mult 1/2/4/4, 16 latent channels, random weights): one decode of the latents of a 512x512
image (--size changes it) and one encode of that image, median of --runs after --warmup,
beside `atelier bench --vae` (which times the same).

--save PATH writes the same (seeded, randn * 0.02) weights in Black Forest Labs key layout,
float32, so the Rust side can be benchmarked on the identical model (~0.65 GB for the full
config). --threads N overrides the thread count; --runs/--warmup change the repetitions.
"""

import argparse
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from diffusers import FluxPipeline, FluxTransformer2DModel  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from flux_convert import diffusers_to_bfl  # noqa: E402

FULL = dict(
    config=dict(
        patch_size=1, in_channels=64, num_layers=4, num_single_layers=8, attention_head_dim=128,
        num_attention_heads=6, joint_attention_dim=4096, pooled_projection_dim=768,
        guidance_embeds=False, axes_dims_rope=(16, 56, 56),
    ),
    grid=(32, 32),  # packed token grid -> 1024 image tokens
    txt_len=128,
)
QUICK = dict(
    config=dict(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=24,
        guidance_embeds=False, axes_dims_rope=(4, 6, 6),
    ),
    grid=(4, 4),
    txt_len=8,
)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny config, just checks the script runs")
    ap.add_argument("--save", metavar="PATH", help="also save the weights (BFL layout, f32 safetensors)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--vae", action="store_true", help="time the FLUX VAE's decode and encode instead")
    ap.add_argument("--size", type=int, default=512, help="image side for --vae")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32",
                    help="bf16: the transformer and its inputs in torch.bfloat16 (oneDNN's bf16 kernels, AMX "
                         "where the CPU has it), beside `atelier bench --dtype bf16`")
    args = ap.parse_args()

    if args.vae:
        return bench_vae(args)
    spec = QUICK if args.quick else FULL
    cfg = spec["config"]
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = FluxTransformer2DModel(**cfg)
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.02)
    model.eval()
    n_params = sum(p.numel() for p in model.parameters())

    if args.save:
        sd = {k: v.detach() for k, v in model.state_dict().items()}
        bfl = diffusers_to_bfl(sd, cfg["num_layers"], cfg["num_single_layers"])
        os.makedirs(os.path.dirname(os.path.abspath(args.save)), exist_ok=True)
        save_file(bfl, args.save)
        print(f"saved BFL-layout f32 weights to {args.save} ({os.path.getsize(args.save) / 2**20:.1f} MiB)")
        del bfl, sd

    g = torch.Generator("cpu").manual_seed(1)
    h, w = spec["grid"]
    img = torch.randn(1, h * w, cfg["in_channels"], generator=g)
    txt = torch.randn(1, spec["txt_len"], cfg["joint_attention_dim"], generator=g)
    y = torch.randn(1, cfg["pooled_projection_dim"], generator=g)
    t = torch.tensor([0.5])
    img_ids = FluxPipeline._prepare_latent_image_ids(1, h, w, "cpu", torch.float32)
    txt_ids = torch.zeros(spec["txt_len"], 3)
    if args.dtype == "bf16":
        model = model.to(torch.bfloat16)
        img, txt, y, t = (v.to(torch.bfloat16) for v in (img, txt, y, t))

    def step():
        with torch.no_grad():
            return model(
                hidden_states=img, encoder_hidden_states=txt, pooled_projections=y, timestep=t,
                img_ids=img_ids, txt_ids=txt_ids, guidance=None, return_dict=False,
            )[0]

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        out = step()
        times.append(time.perf_counter() - t0)

    print(f"torch {torch.__version__}, {args.dtype}, threads {torch.get_num_threads()}, "
          f"{'QUICK' if args.quick else 'full'} config: {n_params / 1e6:.1f}M params, "
          f"{h * w} img + {spec['txt_len']} txt tokens, out {tuple(out.shape)}")
    print(f"runs: {', '.join(f'{x:.4f}' for x in times)}")
    print(f"median seconds per step: {statistics.median(times):.4f}")


def bench_vae(args):
    from diffusers import AutoencoderKL

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512],
        layers_per_block=2, latent_channels=16, norm_num_groups=32, use_quant_conv=False,
        use_post_quant_conv=False,
    ).eval()
    side = args.size
    g = torch.Generator("cpu").manual_seed(1)
    z = torch.randn(1, 16, side // 8, side // 8, generator=g)
    x = torch.rand(1, 3, side, side, generator=g) * 2 - 1

    def timed(f):
        for _ in range(args.warmup):
            f()
        times = []
        for _ in range(args.runs):
            t0 = time.perf_counter()
            f()
            times.append(time.perf_counter() - t0)
        return times

    with torch.no_grad():
        dec = timed(lambda: vae.decode(z).sample)
        enc = timed(lambda: vae.encode(x).latent_dist.mean)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, FLUX VAE, {side}x{side}")
    print(f"decode runs: {', '.join(f'{t:.3f}' for t in dec)}")
    print(f"median seconds per decode: {statistics.median(dec):.4f}")
    print(f"encode runs: {', '.join(f'{t:.3f}' for t in enc)}")
    print(f"median seconds per encode: {statistics.median(enc):.4f}")


if __name__ == "__main__":
    main()
