"""Learning golden: how far torch + peft moves generations toward the training images when it
trains a LoRA on the tiny schnell pipeline fixture with the settings atelier's learning test
uses. Rewrites tests/fixtures/train/learn/:
  images/{0..3}.png four 32x32 training images of one pattern (red diagonal stripes on white,
                    shifted by i pixels); atelier's test trains on these files
  torch.json        settings, per-step losses (first/last 10-step means), and the distances:
                    d_base / d_lora = min over training latents of ||z - x0_i|| for the final
                    latents z of "zqx" (seed 0, 4 steps, 32x32) without / with the LoRA, and
                    ratio = d_lora / d_base

Training, as atelier does it: VAE posterior mean, (mean - shift) * scale, packed 2x2; caption
"zqx" (the trigger; T5 length 32); sigma = sigmoid(N(0,1)); x_t = (1 - s) x0 + s eps; target
eps - x0; MSE; peft LoRA (rank 4, alpha 4, A kaiming-uniform, B zero) on every Linear of the
blocks (diffusers names, q/k/v split); AdamW lr 1e-3 (torch defaults otherwise);
clip_grad_norm_(1.0); batch 1, images in a seeded random order per epoch; 200 steps.

    ATELIER_TOKENIZERS=weights/tokenizers /root/.cache/ref-venv/bin/python tests/reference/make_learning_golden.py
"""
import json
import os

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import FluxPipeline
from peft import LoraConfig
from PIL import Image
from transformers import CLIPTokenizer, T5TokenizerFast

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
OUT = os.path.join(ROOT, "tests", "fixtures", "train", "learn")
TOK_DIR = os.environ.get("ATELIER_TOKENIZERS", os.path.join(ROOT, "weights", "tokenizers"))
SETTINGS = dict(trigger="zqx", steps=200, rank=4, alpha=4.0, lr=1e-3, size=32, max_sequence_length=32, seed=0,
                sample_seed=0, sample_steps=4)
TARGETS = [
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
    "attn.to_out.0", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
    "ff_context.net.2", "norm1.linear", "norm1_context.linear", "proj_mlp", "proj_out", "norm.linear",
]
torch.set_num_threads(2)


def images():
    os.makedirs(os.path.join(OUT, "images"), exist_ok=True)
    out = []
    for i in range(4):
        a = np.full((32, 32, 3), 250, np.uint8)
        for y in range(32):
            for x in range(32):
                if (x + i) % 8 == y % 8:
                    a[y, x] = (220, 20, 20)
        Image.fromarray(a).save(os.path.join(OUT, "images", f"{i}.png"))
        out.append(a)
    return out


def main():
    s = SETTINGS
    clip_tok = CLIPTokenizer.from_pretrained(os.path.join(TOK_DIR, "clip"))
    t5_tok = T5TokenizerFast(tokenizer_file=os.path.join(TOK_DIR, "t5", "tokenizer.json"))
    folder = os.path.join(ROOT, "tests", "fixtures", "pipeline", "schnell", "diffusers")
    pipe = FluxPipeline.from_pretrained(folder, dtype=torch.float32, tokenizer=clip_tok, tokenizer_2=t5_tok)
    vae, tr = pipe.vae, pipe.transformer

    with torch.no_grad():
        x0s = []
        for a in images():
            x = torch.from_numpy(a).permute(2, 0, 1)[None].float() / 127.5 - 1.0
            z = (vae.encode(x).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor
            x0s.append(FluxPipeline._pack_latents(z, 1, z.shape[1], z.shape[2], z.shape[3]))
        txt, y, txt_ids = pipe.encode_prompt(prompt=s["trigger"], prompt_2=None,
                                             max_sequence_length=s["max_sequence_length"])
    rows = s["size"] // 16
    img_ids = FluxPipeline._prepare_latent_image_ids(1, rows, rows, "cpu", torch.float32)

    def final_latents():
        with torch.no_grad():
            return pipe(prompt_embeds=txt, pooled_prompt_embeds=y, height=s["size"], width=s["size"],
                        num_inference_steps=s["sample_steps"], guidance_scale=0.0,
                        generator=torch.Generator("cpu").manual_seed(s["sample_seed"]), output_type="latent").images

    def distance(z):
        return min(torch.linalg.vector_norm(z - x0).item() for x0 in x0s)

    d_base = distance(final_latents())

    tr.requires_grad_(False)
    targets = [n for n, m in tr.named_modules()
               if isinstance(m, torch.nn.Linear) and "transformer_blocks." in n and any(n.endswith(t) for t in TARGETS)]
    torch.manual_seed(s["seed"])
    tr.add_adapter(LoraConfig(r=s["rank"], lora_alpha=s["alpha"], init_lora_weights=True, target_modules=targets))
    params = [p for p in tr.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=s["lr"])
    g = torch.Generator().manual_seed(s["seed"])
    losses = []
    order = []
    for step in range(s["steps"]):
        if not order:
            order = torch.randperm(4, generator=g).tolist()
        x0 = x0s[order.pop()]
        sigma = torch.sigmoid(torch.randn(1, generator=g))
        noise = torch.randn(x0.shape, generator=g)
        xt = (1 - sigma) * x0 + sigma * noise
        pred = tr(hidden_states=xt, encoder_hidden_states=txt, pooled_projections=y, timestep=sigma,
                  img_ids=img_ids, txt_ids=txt_ids, guidance=None, return_dict=False)[0]
        loss = F.mse_loss(pred, noise - x0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    d_lora = distance(final_latents())
    out = dict(settings=s, d_base=d_base, d_lora=d_lora, ratio=d_lora / d_base,
               loss_first10=float(np.mean(losses[:10])), loss_last10=float(np.mean(losses[-10:])),
               lora_modules=len(targets))
    with open(os.path.join(OUT, "torch.json"), "w") as f:
        json.dump(out, f, indent=2)
        f.write("\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
