# A probe (torch + diffusers, kept out of CI) for issue 17's VAE: fine-tune an AutoencoderKL on the
# demo data for MINUTES of CPU time and print the hold-out PSNR as it goes; ANCHOR > 0 adds
# ANCHOR x the mean squared drift of the encoder's scaled latents from the shipped VAE's (what
# `atelier train-vae --keep-latents` does). Results 2026-12-05 (weights/demo/README.md, 2 cores,
# 10 minutes, lr 3e-4, "shipped" then the VAE before that stage): `shipped 0` 21.13 -> 22.09 dB, drift 0.18; `shipped 1` -> 21.8, drift 0.018.
#   DATA=<train_demo.sh data folder> ~/.cache/ref-venv/bin/python scripts/demo/probe_vae_finetune.py \
#       WIDTHS LAYERS random|shipped ANCHOR MINUTES LR [KL]      (e.g. 16,32,48,48 1 shipped 1 10 3e-4)
import sys, time, glob, math, torch, numpy as np
from diffusers import AutoencoderKL
torch.set_num_threads(2); torch.manual_seed(0)
sys.path.insert(0, __import__('os').path.dirname(__file__))
from probe_data import DATA as D, load
tr,ho=load(D+'/train'),load(D+'/holdout')
widths=[int(c) for c in sys.argv[1].split(',')]; lpb=int(sys.argv[2]); init=sys.argv[3]; anchor=float(sys.argv[4]); minutes=float(sys.argv[5]); lr=float(sys.argv[6]); klw=float(sys.argv[7]) if len(sys.argv)>7 else 1e-4
old=AutoencoderKL.from_pretrained('weights/demo/schnell/vae',torch_dtype=torch.float32).eval()
if init=='shipped':
    new=AutoencoderKL.from_pretrained('weights/demo/schnell/vae',torch_dtype=torch.float32)
else:
    new=AutoencoderKL(block_out_channels=widths,layers_per_block=lpb,latent_channels=16,norm_num_groups=8,use_quant_conv=False,use_post_quant_conv=False,
        down_block_types=['DownEncoderBlock2D']*len(widths),up_block_types=['UpDecoderBlock2D']*len(widths))
print('params',sum(p.numel() for p in new.parameters()),flush=True)
b=lambda t:((t.clamp(-1,1)+1)*127.5).round()
def psnr(vae,x):
    vae.eval()
    with torch.no_grad():
        y=torch.cat([vae.decode(vae.encode(x[i:i+100]).latent_dist.mean).sample for i in range(0,len(x),100)])
    vae.train()
    mse=((b(x)-b(y))**2).mean(dim=(1,2,3)).double()
    return (10*torch.log10(255**2/mse)).mean().item()
with torch.no_grad():
    oldmu=torch.cat([old.encode(tr[i:i+100]).latent_dist.mean for i in range(0,len(tr),100)])
sh,sc=old.config.shift_factor,old.config.scaling_factor
opt=torch.optim.AdamW(new.parameters(),lr=lr,weight_decay=0.0)
t0=time.time(); step=0; B=16; total=minutes*60; g=torch.Generator().manual_seed(1)
while time.time()-t0<total:
    idx=torch.randint(0,len(tr),(B,),generator=g)
    x=tr[idx]
    if '--aug' in sys.argv:
        if torch.rand(1)<0.5: x=x.flip(3)
    fr=(time.time()-t0)/total
    w=min(1.0,step/50)
    for gph in opt.param_groups: gph['lr']=lr*w*0.5*(1+math.cos(math.pi*fr))
    d=new.encode(x).latent_dist
    z=d.mean+d.std*torch.randn_like(d.mean)
    y=new.decode(z).sample
    loss=(y-x).abs().mean()+klw*0.5*(d.mean**2+d.var-d.logvar-1).mean()
    if anchor>0: loss=loss+anchor*(((d.mean-oldmu[idx])*sc)**2).mean()
    opt.zero_grad(); loss.backward(); opt.step(); step+=1
    if step%200==0:
        a=((d.mean-oldmu[idx])*sc).pow(2).mean().sqrt().item()
        print(step, f'{time.time()-t0:.0f}s', f'loss {loss.item():.4f} anchor_rms {a:.3f}', 'ho', round(psnr(new,ho),2), flush=True)
print('final', step, 'ho', psnr(new,ho), 'train400', psnr(new,tr[:400]))
new.save_pretrained(f'/tmp/probe_vae_{sys.argv[1]}_{lpb}_{init}_{anchor}')
