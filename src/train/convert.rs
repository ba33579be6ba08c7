//! Converting a LoRA file between kohya and diffusers/PEFT keys (the download of a library
//! LoRA in the other format). The file is read with the engine's reader (`engine::lora`), so
//! any layout it applies converts; each BFL Linear's changes are fused into one low-rank pair
//! (split q/k/v factors side by side, B block-diagonal, the scale folded into B) and written
//! with the keys `export` writes. Loaders then apply it at alpha = r, the strength it had.

use std::path::Path;

use anyhow::{Result, bail};

use super::export::{Format, diffusers_modules};
use crate::engine::lora::{Change, Lora, Part, Rows};
use crate::engine::weights::write_safetensors_f32;

/// One Linear's changes as one pair: A [rank, inputs], B [outputs, rank] (scale folded in).
struct Fused {
    path: String,
    rank: usize,
    inputs: usize,
    outputs: usize,
    a: Vec<f32>,
    b: Vec<f32>,
}

fn fuse(path: &str, changes: &[(String, Change)]) -> Result<Fused> {
    let mut parts = Vec::new();
    for (key, c) in changes {
        let Change::LowRank { down, up, scale, rows } = c else {
            bail!("{key}: only low-rank LoRAs convert (this one has a full weight or bias delta)");
        };
        let (r, inputs) = (down.shape[0], down.shape[1]);
        let out_rows = up.shape[0];
        let h = inputs;
        let start = match rows {
            Rows::All | Rows::SwapHalves | Rows::Qkv => 0,
            Rows::Block(i) => i * h,
            Rows::Mlp => 3 * h,
        };
        let mut b: Vec<f32> = up.data.iter().map(|v| v * scale).collect();
        if *rows == Rows::SwapHalves {
            let half = out_rows / 2 * r;
            b.rotate_left(half);
        }
        parts.push((r, inputs, start, out_rows, down.data.clone(), b));
    }
    let inputs = parts.first().map_or(0, |p| p.1);
    if parts.iter().any(|p| p.1 != inputs) {
        bail!("{path}: the LoRA's parts disagree on the input width");
    }
    let rank: usize = parts.iter().map(|p| p.0).sum();
    let outputs = parts.iter().map(|p| p.2 + p.3).max().unwrap_or(0);
    let mut a = Vec::with_capacity(rank * inputs);
    let mut b = vec![0f32; outputs * rank];
    let mut col = 0;
    for (r, _, start, rows, down, up) in parts {
        a.extend_from_slice(&down);
        for i in 0..rows {
            for j in 0..r {
                b[(start + i) * rank + col + j] = up[i * r + j];
            }
        }
        col += r;
    }
    Ok(Fused { path: path.to_string(), rank, inputs, outputs, a, b })
}

/// Writes the LoRA at `src` to `dest` in `format`.
pub fn convert(src: &Path, format: Format, dest: &Path) -> Result<()> {
    let lora = Lora::open(src)?;
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    for ((part, path), changes) in &lora.changes {
        if *part != Part::Transformer {
            bail!("this LoRA changes the CLIP text encoder too; it converts only without it");
        }
        let f = fuse(path, changes)?;
        match format {
            Format::Kohya => {
                let name = format!("lora_unet_{}", f.path.replace('.', "_"));
                tensors.push((format!("{name}.alpha"), vec![], vec![f.rank as f32]));
                tensors.push((format!("{name}.lora_down.weight"), vec![f.rank, f.inputs], f.a));
                tensors.push((format!("{name}.lora_up.weight"), vec![f.outputs, f.rank], f.b));
            }
            Format::Peft => {
                for (name, rows) in diffusers_modules(&f.path, f.outputs, f.inputs)? {
                    let up = f.b[rows.start * f.rank..rows.end * f.rank].to_vec();
                    tensors.push((format!("{name}.lora_A.weight"), vec![f.rank, f.inputs], f.a.clone()));
                    tensors.push((format!("{name}.lora_B.weight"), vec![rows.len(), f.rank], up));
                }
            }
        }
    }
    if tensors.is_empty() {
        bail!("the LoRA has no transformer changes to convert");
    }
    let fmt = format!("{format:?}").to_lowercase();
    let meta = [("atelier_format", fmt.as_str()), ("atelier_converted_from", lora.format)];
    let shapes: Vec<(String, Vec<usize>)> = tensors.iter().map(|(n, s, _)| (n.clone(), s.clone())).collect();
    let mut data = tensors.into_iter().map(|(_, _, d)| d);
    write_safetensors_f32(dest, &shapes, &meta, |_, _| data.next().expect("one data vector per tensor"))
}
