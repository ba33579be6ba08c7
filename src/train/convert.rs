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
    // The Linear's whole output width, not just the rows this LoRA covers (a LoRA of q and k
    // only, or of linear1 without proj_mlp): loaders check up's shape against the layer.
    let covered = parts.iter().map(|p| p.2 + p.3).max().unwrap_or(0);
    let outputs = covered.max(layer_outputs(path, inputs));
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

/// The output width of BFL Linear `path` with `inputs` inputs, where the LoRA's rows may not
/// show it: a fused qkv is 3·h; a single block's linear1 is 3·h + the MLP width (FLUX's MLP
/// ratio is 4; a LoRA that covers proj_mlp shows its real width, which wins); others 0 (their
/// covered rows are the whole layer).
fn layer_outputs(path: &str, inputs: usize) -> usize {
    if path.ends_with(".qkv") {
        3 * inputs
    } else if path.ends_with(".linear1") {
        7 * inputs
    } else {
        0
    }
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
                    if up.iter().all(|v| *v == 0.0) {
                        continue; // a module the LoRA does not change (proj_mlp of a q/k/v LoRA)
                    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::SafeTensors;

    /// A diffusers LoRA of q and k only (no v, no proj_mlp), as many trainers write: the kohya
    /// file must still give each fused Linear its whole output width, with zero rows where
    /// the LoRA changes nothing; and back in PEFT, the untouched modules are left out.
    #[test]
    fn a_lora_of_some_rows_converts_to_the_layers_whole_width() {
        let (h, r) = (8, 2);
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("qk.safetensors");
        let mut tensors = Vec::new();
        for m in [
            "transformer_blocks.0.attn.to_q",
            "transformer_blocks.0.attn.to_k",
            "single_transformer_blocks.0.attn.to_q",
        ] {
            tensors.push((format!("transformer.{m}.lora_A.weight"), vec![r, h]));
            tensors.push((format!("transformer.{m}.lora_B.weight"), vec![h, r]));
        }
        let mut n = 0.0;
        write_safetensors_f32(&src, &tensors, &[], |_, shape| {
            n += 1.0;
            vec![n; shape.iter().product()]
        })
        .unwrap();

        let kohya = dir.path().join("kohya.safetensors");
        convert(&src, Format::Kohya, &kohya).unwrap();
        let bytes = std::fs::read(&kohya).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let up = st.tensor("lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight").unwrap();
        assert_eq!(up.shape(), [3 * h, 2 * r], "q and k side by side; v rows zero");
        let vals: Vec<f32> = up.data().chunks(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
        assert!(vals[2 * h * 2 * r..].iter().all(|v| *v == 0.0), "v rows must be zero");
        assert!(vals[..h * 2 * r].iter().any(|v| *v != 0.0));
        let up1 = st.tensor("lora_unet_single_blocks_0_linear1.lora_up.weight").unwrap();
        assert_eq!(up1.shape(), [7 * h, r], "linear1 is q, k, v and the MLP (4h)");

        let peft = dir.path().join("peft.safetensors");
        convert(&kohya, Format::Peft, &peft).unwrap();
        let bytes = std::fs::read(&peft).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let names: Vec<String> = st.names().into_iter().map(|s| s.to_string()).collect();
        assert!(names.iter().any(|n| n.contains("transformer_blocks.0.attn.to_k.lora_B")), "{names:?}");
        assert!(!names.iter().any(|n| n.contains("proj_mlp") || n.contains(".to_v.")), "untouched modules: {names:?}");
    }
}
