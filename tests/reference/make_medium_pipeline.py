"""Writes a medium-size random FluxPipeline (diffusers layout) for timing `atelier generate`.
Run by hand, never by CI; the output (~1.5 GB) stays outside the repo:

    /work/venv-ref/bin/python tests/reference/make_medium_pipeline.py /tmp/flux-medium

Components: transformer hidden 768 (6 x 128 heads, axes 16/56/56), 4 double + 8 single blocks,
schnell-like; the real FLUX VAE architecture (ch 128, mult 1/2/4/4); CLIP-L's real size
(768, 12 layers); a 4-layer T5 of width 1024. Weights are random (randn * 0.02), so the image
is noise: this is for time and memory only.
"""

import sys

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

out = sys.argv[1]
torch.manual_seed(0)
transformer = FluxTransformer2DModel(
    patch_size=1, in_channels=64, num_layers=4, num_single_layers=8, attention_head_dim=128,
    num_attention_heads=6, joint_attention_dim=1024, pooled_projection_dim=768,
    guidance_embeds=False, axes_dims_rope=(16, 56, 56),
)
vae = AutoencoderKL(
    in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512],
    layers_per_block=2, latent_channels=16, norm_num_groups=32, use_quant_conv=False,
    use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159,
)
clip = CLIPTextModel(CLIPTextConfig(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", eos_token_id=2,
))
t5 = T5EncoderModel(T5Config(
    vocab_size=32128, d_model=1024, d_kv=64, d_ff=2816, num_layers=4, num_heads=16,
    feed_forward_proj="gated-gelu", is_encoder_decoder=False,
))
for model in (transformer, vae, clip, t5):
    for p in model.parameters():
        p.data = torch.randn_like(p) * 0.02
scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
tok_dir = "/work/shared/data/tokenizers"
pipe = FluxPipeline(
    scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=CLIPTokenizer.from_pretrained(f"{tok_dir}/clip"),
    text_encoder_2=t5, tokenizer_2=T5TokenizerFast(tokenizer_file=f"{tok_dir}/t5/tokenizer.json"),
    transformer=transformer,
)
pipe.save_pretrained(out)
print("wrote", out)
