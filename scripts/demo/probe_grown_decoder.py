# A probe (torch + diffusers, kept out of CI) of one way to issue 17's VAE bar without retraining the
# transformer: the shipped VAE grown function-preservingly (wider channels, extra resnets whose
# new weights start at zero where they would change the output), its encoder frozen, the
# decoder trained on the frozen latents. Result 2026-12-05 (weights/demo/README.md): +0.36 dB in
# 10 CPU minutes at 3x the parameters, so not the way to 25 dB on 2 cores.
#   ~/.cache/ref-venv/bin/python scripts/demo/probe_grown_decoder.py MULT LAYERS MINUTES LR l1|mse
# (DATA below: a train_demo.sh data folder with train/ and holdout/.)
import sys, time, glob, json, math, torch, numpy as np
from diffusers import AutoencoderKL
torch.set_num_threads(2); torch.manual_seed(0)
sys.path.insert(0, __import__('os').path.dirname(__file__))
from probe_data import DATA as D, load
tr,ho=load(D+'/train'),load(D+'/holdout'); print(tr.shape,ho.shape)
old=AutoencoderKL.from_pretrained('weights/demo/schnell/vae',torch_dtype=torch.float32).eval()
def psnr(vae,x):
    with torch.no_grad():
        y=vae.decode(vae.encode(x).latent_dist.mean).sample
    b=lambda v:((v.clamp(-1,1)+1)*127.5).round()
    mse=((b(x)-b(y))**2).mean(dim=(1,2,3)).double()
    return (10*torch.log10(255**2/mse)).mean().item()
print('old holdout psnr',psnr(old,ho))
mult=float(sys.argv[1]); lpb=int(sys.argv[2]); minutes=float(sys.argv[3]); lr=float(sys.argv[4]); lossk=sys.argv[5]
cfg=dict(old.config); oc=cfg['block_out_channels']
nc=[int(round(c*mult)) for c in oc]; g=cfg['norm_num_groups']; ng=int(round(g*mult))
cfg2={k:v for k,v in cfg.items() if not k.startswith('_')}; cfg2['block_out_channels']=nc; cfg2['norm_num_groups']=ng; cfg2['layers_per_block']=lpb
new=AutoencoderKL(**{k:cfg2[k] for k in ['in_channels','out_channels','down_block_types','up_block_types','block_out_channels','layers_per_block','act_fn','latent_channels','norm_num_groups','scaling_factor','shift_factor','use_quant_conv','use_post_quant_conv','mid_block_add_attention']})
osd=old.state_dict(); nsd=new.state_dict()
with torch.no_grad():
    for k,v in nsd.items():
        if k in osd:
            o=osd[k]
            if k.endswith('.weight') and v.dim()>=2:
                v.normal_(0,0.02) if v.dim()==2 else torch.nn.init.kaiming_normal_(v); v.mul_(0.5)
                # old outputs never read new inputs
                v[:o.shape[0],o.shape[1]:]=0
                # q/k: new outputs zero so scores unchanged
                if any(s in k for s in ['to_q','to_k']): v[o.shape[0]:]=0
                v[tuple(slice(0,s) for s in o.shape)]=o
            else:
                if 'norm' in k and k.endswith('weight'): v.fill_(1)
                else: v.zero_()
                v[:o.shape[0]]=o
        else:
            # a new (deeper) resnet: identity through zero conv2
            if 'conv2' in k: v.zero_()
    # zero-out new channels' outgoing into final/latent outputs handled above (old out rows x new in cols)
print('new holdout psnr at init',psnr(new,ho), 'params', sum(p.numel() for p in new.parameters()), 'old', sum(p.numel() for p in old.parameters()))
for p in new.encoder.parameters(): p.requires_grad_(False)
opt=torch.optim.AdamW([p for p in new.decoder.parameters()],lr=lr)
with torch.no_grad():
    lat=[]; 
    for i in range(0,len(tr),64):
        d=new.encode(tr[i:i+64]).latent_dist; lat.append((d.mean,d.std))
    mu=torch.cat([a for a,_ in lat]); sd=torch.cat([b for _,b in lat])
t0=time.time(); step=0; B=16
total=minutes*60
while time.time()-t0<total:
    idx=torch.randint(0,len(tr),(B,))
    z=mu[idx]+sd[idx]*torch.randn_like(mu[idx])
    fr=(time.time()-t0)/total
    for gph in opt.param_groups: gph['lr']=lr*0.5*(1+math.cos(math.pi*fr))
    y=new.decode(z).sample; x=tr[idx]
    loss=(y-x).abs().mean() if lossk=='l1' else (y-x).abs().mean()+((y-x)**2).mean()
    opt.zero_grad(); loss.backward(); opt.step(); step+=1
    if step%100==0: print(step, f'{time.time()-t0:.0f}s', loss.item(), 'psnr', psnr(new,ho), flush=True)
print('final', step, psnr(new,ho))
