"""Times LoRA training steps of a mid-size FLUX transformer in torch + peft (CPU, float32): the
baseline for `atelier bench --train`. Run by hand, never by CI:

    nice -n 10 /root/.cache/ref-venv/bin/python tests/reference/bench_train_torch.py --grid 16 16
    nice -n 10 /root/.cache/ref-venv/bin/python tests/reference/bench_train_torch.py --grid 16 16 --checkpointing

Model: the one of bench_torch.py (FluxTransformer2DModel, hidden 768 = 6 heads x 128, 4 double +
8 single blocks, joint_attention_dim 4096, pooled 768, no guidance), weights randn * 0.02, frozen;
a peft LoRA (rank 16, alpha 16, A kaiming-uniform, B zero) on every Linear of the blocks (diffusers
names: q/k/v split, so 3 pairs where atelier trains one fused pair); batch 1, a packed grid of
--grid tokens (16 x 16 = 256 tokens = a 256^2 image; 32 x 32 for 512^2) + 128 text tokens.
One step = forward, flow-matching MSE, backward, clip_grad_norm_(1.0), AdamW (torch defaults).
--checkpointing turns on diffusers' per-block gradient checkpointing (the analogue of atelier's
block recompute). torch.set_num_threads(2) by default. Prints the median step and the process's
peak RSS (ru_maxrss: it includes building the model).
"""

import argparse
import resource
import statistics
import time

import torch
import torch.nn.functional as F
from diffusers import FluxPipeline, FluxTransformer2DModel
from peft import LoraConfig

CONFIG = dict(
    patch_size=1, in_channels=64, num_layers=4, num_single_layers=8, attention_head_dim=128,
    num_attention_heads=6, joint_attention_dim=4096, pooled_projection_dim=768,
    guidance_embeds=False, axes_dims_rope=(16, 56, 56),
)
TARGETS = [
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
    "attn.to_out.0", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
    "ff_context.net.2", "norm1.linear", "norm1_context.linear", "proj_mlp", "proj_out", "norm.linear",
]


def rss_mib(kind):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(kind):
                return int(line.split()[1]) / 1024
    return float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grid", type=int, nargs=2, default=(16, 16))
    ap.add_argument("--txt-len", type=int, default=128)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = FluxTransformer2DModel(**CONFIG)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.02)
    model.requires_grad_(False)
    targets = [n for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and "transformer_blocks." in n
               and any(n.endswith(t) for t in TARGETS)]
    model.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights=True, target_modules=targets))
    if args.checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    g = torch.Generator("cpu").manual_seed(1)
    h, w = args.grid
    x0 = torch.randn(1, h * w, CONFIG["in_channels"], generator=g)
    noise = torch.randn(1, h * w, CONFIG["in_channels"], generator=g)
    txt = torch.randn(1, args.txt_len, CONFIG["joint_attention_dim"], generator=g)
    y = torch.randn(1, CONFIG["pooled_projection_dim"], generator=g)
    sigma = torch.tensor([0.5])
    img_ids = FluxPipeline._prepare_latent_image_ids(1, h, w, "cpu", torch.float32)
    txt_ids = torch.zeros(args.txt_len, 3)

    def step():
        xt = (1 - sigma) * x0 + sigma * noise
        pred = model(hidden_states=xt, encoder_hidden_states=txt, pooled_projections=y, timestep=sigma,
                     img_ids=img_ids, txt_ids=txt_ids, guidance=None, return_dict=False)[0]
        loss = F.mse_loss(pred, noise - x0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    rss_before = rss_mib("VmRSS:")
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {h * w} img + {args.txt_len} txt tokens, "
          f"LoRA rank {args.rank} on {len(targets)} Linears ({sum(p.numel() for p in params) / 1e6:.2f}M values), "
          f"gradient checkpointing {'on' if args.checkpointing else 'off'}")
    print(f"runs: {', '.join(f'{x:.3f}' for x in times)}")
    print(f"median seconds per training step: {statistics.median(times):.3f}")
    print(f"RSS before the steps {rss_before:.0f} MiB, process peak RSS {peak:.0f} MiB")


if __name__ == "__main__":
    main()
