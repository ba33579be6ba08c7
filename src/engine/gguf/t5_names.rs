//! llama.cpp's names for the T5 encoder: what city96's `t5-v1_1-xxl-encoder-*.gguf` files
//! (architecture `t5encoder`) and llama.cpp's whole-T5 conversions (`t5`, with a decoder beside
//! the encoder) hold, ComfyUI-GGUF and stable-diffusion.cpp read, and `atelier quantize` writes.
//! Mapped both ways onto transformers' names, the ones `T5Encoder` walks (as gguf-py's
//! `tensor_mapping.py` does for the conversion).

/// The architectures whose encoder is FLUX's T5 (`general.architecture`).
pub const ARCHITECTURES: [&str; 2] = ["t5encoder", "t5"];

/// Per block: transformers' part → llama.cpp's.
const BLOCK_PARTS: [(&str, &str); 10] = [
    ("layer.0.layer_norm", "attn_norm"),
    ("layer.0.SelfAttention.q", "attn_q"),
    ("layer.0.SelfAttention.k", "attn_k"),
    ("layer.0.SelfAttention.v", "attn_v"),
    ("layer.0.SelfAttention.o", "attn_o"),
    ("layer.0.SelfAttention.relative_attention_bias", "attn_rel_b"),
    ("layer.1.layer_norm", "ffn_norm"),
    ("layer.1.DenseReluDense.wi_0", "ffn_gate"),
    ("layer.1.DenseReluDense.wi_1", "ffn_up"),
    ("layer.1.DenseReluDense.wo", "ffn_down"),
];

/// Outside the blocks.
const WHOLE: [(&str, &str); 2] =
    [("shared.weight", "token_embd.weight"), ("encoder.final_layer_norm.weight", "enc.output_norm.weight")];

/// transformers' name → llama.cpp's (None for a name the encoder does not have).
pub fn to_llama(name: &str) -> Option<String> {
    translate(name, true)
}

/// llama.cpp's name → transformers' (None for a name of no encoder tensor).
pub fn from_llama(name: &str) -> Option<String> {
    translate(name, false)
}

/// One table read either way: (transformers, llama.cpp) pairs, `to_llama` picking the side.
fn translate(name: &str, to_llama: bool) -> Option<String> {
    let side = |&(t, l): &(&'static str, &'static str)| if to_llama { (t, l) } else { (l, t) };
    if let Some((_, out)) = WHOLE.iter().map(side).find(|(from, _)| *from == name) {
        return Some(out.to_string());
    }
    let (prefix, out_prefix) = side(&("encoder.block.", "enc.blk."));
    let (block, rest) = name.strip_prefix(prefix)?.split_once('.')?;
    block.parse::<usize>().ok()?;
    let part = rest.strip_suffix(".weight")?;
    let (_, out) = BLOCK_PARTS.iter().map(side).find(|(from, _)| *from == part)?;
    Some(format!("{out_prefix}{block}.{out}.weight"))
}

/// The decoder of a whole-T5 file (`dec.*`, the LM head `output.weight`): not FLUX's, skipped.
pub fn is_decoder(name: &str) -> bool {
    name.starts_with("dec.") || name == "output.weight"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_both_ways() {
        let pairs = [
            ("shared.weight", "token_embd.weight"),
            ("encoder.final_layer_norm.weight", "enc.output_norm.weight"),
            ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "enc.blk.0.attn_rel_b.weight"),
            ("encoder.block.23.layer.1.DenseReluDense.wi_0.weight", "enc.blk.23.ffn_gate.weight"),
            ("encoder.block.3.layer.1.DenseReluDense.wi_1.weight", "enc.blk.3.ffn_up.weight"),
            ("encoder.block.3.layer.1.DenseReluDense.wo.weight", "enc.blk.3.ffn_down.weight"),
            ("encoder.block.1.layer.0.SelfAttention.o.weight", "enc.blk.1.attn_o.weight"),
            ("encoder.block.1.layer.1.layer_norm.weight", "enc.blk.1.ffn_norm.weight"),
        ];
        for (t, l) in pairs {
            assert_eq!(to_llama(t).as_deref(), Some(l));
            assert_eq!(from_llama(l).as_deref(), Some(t));
        }
        for odd in ["enc.blk.x.attn_q.weight", "enc.blk.0.attn_qkv.weight", "dec.blk.0.attn_q.weight", "output.weight"]
        {
            assert_eq!(from_llama(odd), None, "{odd}");
        }
        assert!(
            is_decoder("dec.blk.0.attn_q.weight")
                && is_decoder("output.weight")
                && !is_decoder("enc.output_norm.weight")
        );
    }
}
