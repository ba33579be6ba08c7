//! The T5 tokenizer as llama.cpp stores it in a GGUF (`tokenizer.ggml.*`, model `t5`): what
//! `convert_hf_to_gguf.py` writes for a T5 encoder from its SentencePiece model, so that a T5
//! GGUF written by `atelier quantize` carries its tokenizer like llama.cpp's and city96's files.
//!
//! The pieces come from a `tokenizers` Unigram `tokenizer.json` (the form diffusers' FLUX
//! folders and atelier's built-in copy have): its first pieces are the SentencePiece model's,
//! then T5's 100 `<extra_id_N>` sentinels, which the SentencePiece model does not have. llama.cpp
//! names every id past the SentencePiece pieces `[PAD{id}]` (unused, score −10000) up to the
//! model's vocabulary size (32128 for T5 v1.1), so the sentinels are written that way too.

use std::collections::BTreeMap;

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine as _;
use serde_json::Value as Json;

use super::header::Value;
use super::writer::MetaValue;

/// llama.cpp's (and SentencePiece's) token types.
const NORMAL: i32 = 1;
const UNKNOWN: i32 = 2;
const CONTROL: i32 = 3;
const UNUSED: i32 = 5;
/// The score llama.cpp gives the `[PAD{id}]` fill.
const PAD_SCORE: f32 = -10000.0;

/// A T5 (Unigram) tokenizer in llama.cpp's terms.
#[derive(Debug, Clone, PartialEq)]
pub struct T5Vocab {
    pub tokens: Vec<String>,
    pub scores: Vec<f32>,
    pub types: Vec<i32>,
    pub add_space_prefix: bool,
    pub remove_extra_whitespaces: bool,
    /// SentencePiece's normalisation table (NFKC and T5's extras), as the model file has it.
    pub precompiled_charsmap: Vec<u8>,
    pub eos: u32,
    pub unk: u32,
    pub pad: u32,
}

impl T5Vocab {
    /// From a `tokenizer.json` (Unigram), its ids padded to `n_vocab` (the embedding's rows).
    pub fn from_tokenizer_json(bytes: &[u8], n_vocab: usize) -> Result<Self> {
        let json: Json = serde_json::from_slice(bytes).context("not a tokenizer.json")?;
        let model = &json["model"];
        if model["type"] != "Unigram" {
            bail!("a T5 tokenizer is a Unigram model, not {}", model["type"]);
        }
        let vocab = model["vocab"].as_array().ok_or_else(|| anyhow!("the tokenizer has no vocab"))?;
        let unk = model["unk_id"].as_u64().ok_or_else(|| anyhow!("the tokenizer has no unk_id"))? as u32;
        let added: BTreeMap<u32, &str> = json["added_tokens"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|t| t["special"] == true)
            .filter_map(|t| Some((t["id"].as_u64()? as u32, t["content"].as_str()?)))
            .collect();
        let id_of = |piece: &str| added.iter().find(|(_, c)| **c == piece).map(|(id, _)| *id);
        let (Some(eos), Some(pad)) = (id_of("</s>"), id_of("<pad>")) else {
            bail!("the tokenizer has no </s> or <pad> token (not T5's)");
        };
        // The SentencePiece pieces: everything before the first sentinel.
        let sentinel = |p: &str| p.strip_prefix("<extra_id_").and_then(|r| r.strip_suffix('>')).is_some();
        let mut tokens: Vec<String> = (0..n_vocab).map(|i| format!("[PAD{i}]")).collect();
        let mut scores = vec![PAD_SCORE; n_vocab];
        let mut types = vec![UNUSED; n_vocab];
        let mut pieces = 0;
        for (id, entry) in vocab.iter().enumerate() {
            let (Some(piece), Some(score)) = (entry[0].as_str(), entry[1].as_f64()) else {
                bail!("vocab entry {id} is not [piece, score]");
            };
            if sentinel(piece) {
                break;
            }
            if id >= n_vocab {
                bail!("the tokenizer has more pieces than the model's {n_vocab} embeddings");
            }
            tokens[id] = piece.to_string();
            scores[id] = score as f32;
            types[id] = match id as u32 {
                i if i == unk => UNKNOWN,
                i if added.contains_key(&i) => CONTROL,
                _ => NORMAL,
            };
            pieces += 1;
        }
        if pieces <= eos.max(pad).max(unk) as usize {
            bail!("the tokenizer's special ids lie past its {pieces} pieces");
        }
        let normalizers = match &json["normalizer"] {
            Json::Null => vec![],
            n if n["type"] == "Sequence" => n["normalizers"].as_array().cloned().unwrap_or_default(),
            n => vec![n.clone()],
        };
        let mut precompiled_charsmap = vec![];
        let mut remove_extra_whitespaces = false;
        for n in &normalizers {
            if n["type"] == "Precompiled" {
                let b64 = n["precompiled_charsmap"].as_str().unwrap_or_default();
                precompiled_charsmap =
                    base64::engine::general_purpose::STANDARD.decode(b64).context("the precompiled charsmap")?;
            }
            // What `tokenizers`' converter emits for SentencePiece's remove_extra_whitespaces.
            if n["type"] == "Replace" && n["pattern"]["Regex"] == " {2,}" {
                remove_extra_whitespaces = true;
            }
        }
        let pre = &json["pre_tokenizer"];
        let metaspace = match pre["type"].as_str() {
            Some("Metaspace") => Some(pre),
            Some("Sequence") => {
                pre["pretokenizers"].as_array().and_then(|p| p.iter().find(|p| p["type"] == "Metaspace"))
            }
            _ => None,
        };
        let add_space_prefix = metaspace.is_some_and(|m| {
            m["add_prefix_space"] == true || m["prepend_scheme"].as_str().is_some_and(|s| s != "never")
        });
        Ok(T5Vocab {
            tokens,
            scores,
            types,
            add_space_prefix,
            remove_extra_whitespaces,
            precompiled_charsmap,
            eos,
            unk,
            pad,
        })
    }

    /// The tokenizer a GGUF's metadata carries (None: it has none, or not a T5 one).
    pub fn from_gguf(meta: &BTreeMap<String, Value>) -> Result<Option<Self>> {
        if meta.get("tokenizer.ggml.model").and_then(Value::as_str) != Some("t5") {
            return Ok(None);
        }
        let items = |key: &str| match meta.get(key) {
            Some(Value::Array(items)) => Ok(items.as_slice()),
            _ => bail!("{key} is missing or not an array"),
        };
        let id = |key: &str| {
            meta.get(key).and_then(Value::as_int).map(|v| v as u32).ok_or_else(|| anyhow!("{key} is missing"))
        };
        let flag = |key: &str, default: bool| match meta.get(key) {
            Some(Value::Bool(b)) => *b,
            _ => default,
        };
        let tokens = items("tokenizer.ggml.tokens")?
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| anyhow!("tokenizer.ggml.tokens holds a non-string"))?;
        let scores = items("tokenizer.ggml.scores")?
            .iter()
            .map(|v| v.as_float().map(|x| x as f32))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| anyhow!("tokenizer.ggml.scores holds a non-number"))?;
        let types = items("tokenizer.ggml.token_type")?
            .iter()
            .map(|v| v.as_int().map(|x| x as i32))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| anyhow!("tokenizer.ggml.token_type holds a non-integer"))?;
        if scores.len() != tokens.len() || types.len() != tokens.len() {
            bail!("{} tokens, {} scores and {} token types", tokens.len(), scores.len(), types.len());
        }
        let precompiled_charsmap = match meta.get("tokenizer.ggml.precompiled_charsmap") {
            None => vec![],
            Some(_) => items("tokenizer.ggml.precompiled_charsmap")?
                .iter()
                .map(|v| v.as_int().and_then(|b| u8::try_from(b).ok()))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| anyhow!("tokenizer.ggml.precompiled_charsmap holds a non-byte"))?,
        };
        Ok(Some(T5Vocab {
            tokens,
            scores,
            types,
            add_space_prefix: flag("tokenizer.ggml.add_space_prefix", true),
            remove_extra_whitespaces: flag("tokenizer.ggml.remove_extra_whitespaces", true),
            precompiled_charsmap,
            eos: id("tokenizer.ggml.eos_token_id")?,
            unk: id("tokenizer.ggml.unknown_token_id")?,
            pad: id("tokenizer.ggml.padding_token_id")?,
        }))
    }

    /// The `tokenizer.ggml.*` key/values in the order llama.cpp's converter writes them
    /// (`set_vocab`, then the special ids, then the add-bos/eos flags).
    pub fn metadata(&self) -> Vec<(String, MetaValue)> {
        let mut m = vec![
            ("model", MetaValue::Str("t5".into())),
            ("pre", MetaValue::Str("default".into())),
            ("tokens", MetaValue::Strings(self.tokens.clone())),
            ("scores", MetaValue::F32s(self.scores.clone())),
            ("token_type", MetaValue::I32s(self.types.clone())),
            ("add_space_prefix", MetaValue::Bool(self.add_space_prefix)),
            ("remove_extra_whitespaces", MetaValue::Bool(self.remove_extra_whitespaces)),
        ];
        if !self.precompiled_charsmap.is_empty() {
            m.push(("precompiled_charsmap", MetaValue::U8s(self.precompiled_charsmap.clone())));
        }
        m.extend([
            ("eos_token_id", MetaValue::U32(self.eos)),
            ("unknown_token_id", MetaValue::U32(self.unk)),
            ("padding_token_id", MetaValue::U32(self.pad)),
            ("add_bos_token", MetaValue::Bool(false)),
            ("add_eos_token", MetaValue::Bool(true)),
        ]);
        m.into_iter().map(|(k, v)| (format!("tokenizer.ggml.{k}"), v)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T5: &[u8] = crate::engine::tokenize::T5_TOKENIZER_JSON;

    #[test]
    fn the_t5_tokenizer_maps_onto_llama_cpps_vocabulary() {
        let v = T5Vocab::from_tokenizer_json(T5, 32128).unwrap();
        assert_eq!(v.tokens.len(), 32128);
        assert_eq!((v.pad, v.eos, v.unk), (0, 1, 2));
        assert_eq!(&v.types[..4], &[CONTROL, CONTROL, UNKNOWN, NORMAL]);
        assert_eq!(v.tokens[3], "▁");
        assert_eq!((v.tokens[31999].as_str(), v.types[31999]), ("▁Internațional", NORMAL));
        // The sentinels and the rest up to the embedding's rows: llama.cpp's fill.
        assert_eq!((v.tokens[32000].as_str(), v.scores[32000], v.types[32000]), ("[PAD32000]", PAD_SCORE, UNUSED));
        assert_eq!(v.tokens[32127], "[PAD32127]");
        assert!(v.add_space_prefix && v.remove_extra_whitespaces);
        assert_eq!(v.precompiled_charsmap.len(), 237539);
        // Fewer embeddings than pieces: refused, not truncated.
        let e = T5Vocab::from_tokenizer_json(T5, 300).unwrap_err().to_string();
        assert!(e.contains("more pieces than the model's 300"), "{e}");
        assert!(T5Vocab::from_tokenizer_json(b"{}", 10).is_err());
    }
}
