"""Golden for GGUF T5 encoders (tests/fixtures/gguf/t5_mixed*): llama.cpp's T5 names, as in
city96's t5-v1_1-xxl-encoder-*.gguf files, with every ggml block type among its tensors.

Run from the repository root with a venv holding numpy, torch, transformers, safetensors, gguf:

    nice -n 10 "$REF_VENV/bin/python" tests/reference/make_t5_gguf_goldens.py

Writes
  gguf/t5_mixed.gguf                a T5 v1.1 encoder (d_model 256 so K-quant rows are whole
                                    blocks, 4 heads of 32, d_ff 256, 2 blocks, 300-token vocab),
                                    general.architecture "t5encoder" and llama.cpp's metadata keys;
                                    its matrices spread over Q8_0 Q4_0 Q4_1 Q5_0 Q5_1 Q2_K Q3_K Q4_K
                                    Q5_K Q6_K F16 BF16 F32 (legacy quants by gguf.quants.quantize of
                                    random weights; gguf-py cannot quantize K-quants, so those are
                                    random valid blocks), norms F32, the position bias F16
  gguf/t5_mixed_golden.safetensors  ids [2, 12] (as f32) and transformers' T5EncoderModel
                                    last_hidden_state [2, 12, 256] with the weights gguf's
                                    dequantize reads back from that file
  quantize/t5_q8_0.gguf             those dequantized weights written back by the package's
                                    GGUFWriter as `atelier quantize --type q8_0` must write a T5:
                                    llama.cpp's names sorted, general.* then t5encoder.* metadata,
                                    norms and attn_rel_b F32, other matrices Q8_0 (F16 where rows
                                    are not whole blocks)
  quantize/t5_tokenizer.json        the sha256 and size of a GGUF holding only llama.cpp's T5
                                    tokenizer keys (convert_hf_to_gguf.py's T5 set_vocab over the
                                    built-in tokenizer, 32128 ids) as the package writes them;
                                    checked first by rebuilding a SentencePiece model from that
                                    file (as ComfyUI-GGUF does) and tokenizing the prompts of
                                    tokenizers_expected.json. `... tokenizer` makes this one alone
                                    (needs sentencepiece and protobuf too).
"""

import base64
import os
import sys

import numpy as np
import torch
from safetensors.numpy import save_file

import gguf
from gguf import GGMLQuantizationType as T

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_gguf_goldens import random_blocks  # noqa: E402
from transformers import T5Config, T5EncoderModel

OUT = "tests/fixtures/gguf"
D, HEADS, DKV, FF, LAYERS, VOCAB, BUCKETS = 256, 4, 32, 256, 2, 300, 32

# llama.cpp name → (transformers name, PyTorch shape)
PARTS = {
    "attn_norm": ("layer.0.layer_norm", (D,)),
    "attn_q": ("layer.0.SelfAttention.q", (HEADS * DKV, D)),
    "attn_k": ("layer.0.SelfAttention.k", (HEADS * DKV, D)),
    "attn_v": ("layer.0.SelfAttention.v", (HEADS * DKV, D)),
    "attn_o": ("layer.0.SelfAttention.o", (D, HEADS * DKV)),
    "ffn_norm": ("layer.1.layer_norm", (D,)),
    "ffn_gate": ("layer.1.DenseReluDense.wi_0", (FF, D)),
    "ffn_up": ("layer.1.DenseReluDense.wi_1", (FF, D)),
    "ffn_down": ("layer.1.DenseReluDense.wo", (D, FF)),
}
# The matrices' types: each block type once at least (attn_o's rows of 128 take no K-quant).
TYPES = [
    {"attn_q": T.Q8_0, "attn_k": T.Q4_0, "attn_v": T.Q4_1, "attn_o": T.Q5_0,
     "ffn_gate": T.Q2_K, "ffn_up": T.Q3_K, "ffn_down": T.Q4_K},
    {"attn_q": T.Q5_K, "attn_k": T.Q6_K, "attn_v": T.Q5_1, "attn_o": T.BF16,
     "ffn_gate": T.F16, "ffn_up": T.Q8_0, "ffn_down": T.F32},
]
KQUANTS = {T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K}


def encode(rng, qtype, shape, scale):
    """(data, raw_dtype) for GGUFWriter.add_tensor."""
    if qtype in KQUANTS:
        return random_blocks(rng, qtype, shape[0], shape[1]), qtype
    x = (rng.standard_normal(shape) * scale).astype(np.float32)
    if qtype == T.F32:
        return x, None
    if qtype == T.F16:
        return x.astype(np.float16), None
    if qtype == T.BF16:
        return (x.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8), T.BF16
    return gguf.quants.quantize(x, qtype), qtype


def add_t5_metadata(w):
    """llama.cpp's t5encoder keys, in the order atelier writes them after general.*."""
    w.add_context_length(512)
    w.add_embedding_length(D)
    w.add_feed_forward_length(FF)
    w.add_block_count(LAYERS)
    w.add_head_count(HEADS)
    w.add_key_length(DKV)
    w.add_value_length(DKV)
    w.add_layer_norm_eps(1e-6)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_relative_attn_buckets_count(BUCKETS)


def main():
    rng = np.random.default_rng(5)
    path = os.path.join(OUT, "t5_mixed.gguf")
    w = gguf.GGUFWriter(path, "t5encoder")
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_t5_metadata(w)
    data, raw = encode(rng, T.Q8_0, (VOCAB, D), 1.0)
    w.add_tensor("token_embd.weight", data, raw_dtype=raw)
    w.add_tensor("enc.output_norm.weight", (1 + 0.1 * rng.standard_normal(D)).astype(np.float32))
    bias = (rng.standard_normal((BUCKETS, HEADS)) * 0.5).astype(np.float16)
    w.add_tensor("enc.blk.0.attn_rel_b.weight", bias)
    for i in range(LAYERS):
        for part, (_, shape) in PARTS.items():
            name = f"enc.blk.{i}.{part}.weight"
            if len(shape) == 1:
                w.add_tensor(name, (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32))
            else:
                data, raw = encode(rng, TYPES[i][part], shape, 1 / np.sqrt(shape[1]))
                w.add_tensor(name, data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    # Read back and dequantized by the gguf package: the weights the reference runs.
    state = {}
    for t in gguf.GGUFReader(path).tensors:
        shape = [int(d) for d in reversed(t.shape)]
        x = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)
        assert np.isfinite(x).all(), t.name
        if t.name == "token_embd.weight":
            key = "shared.weight"
        elif t.name == "enc.output_norm.weight":
            key = "encoder.final_layer_norm.weight"
        elif t.name == "enc.blk.0.attn_rel_b.weight":
            key = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        else:
            _, _, i, part, _ = t.name.split(".")
            key = f"encoder.block.{i}.{PARTS[part][0]}.weight"
        state[key] = torch.from_numpy(np.ascontiguousarray(x))
    config = T5Config(vocab_size=VOCAB, d_model=D, d_kv=DKV, d_ff=FF, num_layers=LAYERS, num_heads=HEADS,
                      relative_attention_num_buckets=BUCKETS, relative_attention_max_distance=128,
                      feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, dropout_rate=0.0)
    model = T5EncoderModel(config).eval()
    state["encoder.embed_tokens.weight"] = state["shared.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    ids = torch.tensor([[37, 8, 299, 0, 1, 5, 100, 7, 7, 250, 1, 0], [3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 1, 0]])
    with torch.no_grad():
        out = model(input_ids=ids).last_hidden_state
    save_file({"ids": ids.float().numpy(), "last_hidden_state": out.float().numpy()},
              os.path.join(OUT, "t5_mixed_golden.safetensors"))
    types = sorted({t.tensor_type.name for t in gguf.GGUFReader(path).tensors})
    print(path, os.path.getsize(path), "bytes;", types, "; out std", float(out.std()))


def quantized_q8_0():
    src = gguf.GGUFReader(os.path.join(OUT, "t5_mixed.gguf"))
    path = "tests/fixtures/quantize/t5_q8_0.gguf"
    w = gguf.GGUFWriter(path, "t5encoder")
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_file_type(7)  # LLAMA_FTYPE_MOSTLY_Q8_0
    add_t5_metadata(w)
    for t in sorted(src.tensors, key=lambda t: t.name):
        shape = [int(d) for d in reversed(t.shape)]
        x = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)
        if x.ndim == 1 or ".attn_rel_b." in t.name:
            w.add_tensor(t.name, x)
        elif shape[-1] % 32:
            w.add_tensor(t.name, x.astype(np.float16))
        else:
            w.add_tensor(t.name, gguf.quants.quantize(x, T.Q8_0), raw_dtype=T.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(path, os.path.getsize(path), "bytes")


def llama_cpp_vocab(tokenizer_json, vocab_size):
    """What llama.cpp's convert_hf_to_gguf.py (T5Model.set_vocab) writes for a T5 whose
    SentencePiece model is the Unigram in `tokenizer_json`: every id `[PAD{id}]` (score -10000,
    UNUSED), then the SentencePiece pieces (the vocab before T5's `<extra_id_N>` sentinels,
    which the SentencePiece model does not have) with their scores and types."""
    import json
    t = json.load(open(tokenizer_json))
    special = {a["id"] for a in t["added_tokens"] if a["special"]}
    unk = t["model"]["unk_id"]
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [gguf.TokenType.UNUSED] * vocab_size
    for i, (piece, score) in enumerate(t["model"]["vocab"]):
        if piece.startswith("<extra_id_"):
            break
        tokens[i] = piece.encode()
        scores[i] = score
        types[i] = gguf.TokenType.UNKNOWN if i == unk else gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
    norms = t["normalizer"]["normalizers"]
    charsmap = base64.b64decode(next(n for n in norms if n["type"] == "Precompiled")["precompiled_charsmap"])
    remove_ws = any(n["type"] == "Replace" and n["pattern"].get("Regex") == " {2,}" for n in norms)
    return tokens, scores, types, t["pre_tokenizer"]["add_prefix_space"], remove_ws, charsmap


def tokenizer_golden():
    """quantize/t5_tokenizer.json: the sha256 of a GGUF holding only llama.cpp's T5 tokenizer
    keys (the built-in tokenizer over the tiny pipeline T5's 32128 embeddings), written by the
    package's writer in the converter's order; atelier must write the same bytes. Then the
    file is read back the way ComfyUI-GGUF rebuilds a SentencePiece model from a GGUF, and that
    model must tokenize the prompts of tokenizers_expected.json as transformers does."""
    import hashlib
    import json
    import tempfile

    from sentencepiece import SentencePieceProcessor
    from sentencepiece import sentencepiece_model_pb2 as spm_pb2

    tokens, scores, types, prefix, remove_ws, charsmap = llama_cpp_vocab("weights/tokenizers/t5/tokenizer.json", 32128)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "t5_tokenizer.gguf")
        w = gguf.GGUFWriter(path, "t5encoder")
        w.add_tokenizer_model("t5")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_scores(scores)
        w.add_token_types(types)
        w.add_add_space_prefix(prefix)
        w.add_remove_extra_whitespaces(remove_ws)
        w.add_precompiled_charsmap(charsmap)
        w.add_eos_token_id(1)
        w.add_unk_token_id(2)
        w.add_pad_token_id(0)
        w.add_add_bos_token(False)
        w.add_add_eos_token(True)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.close()
        data = open(path, "rb").read()

        r = gguf.GGUFReader(path)
        field = lambda k: r.fields[k]  # noqa: E731
        proto = spm_pb2.ModelProto()
        proto.trainer_spec.model_type = 1  # UNIGRAM
        proto.trainer_spec.unk_id = int(field("tokenizer.ggml.unknown_token_id").contents())
        proto.trainer_spec.eos_id = int(field("tokenizer.ggml.eos_token_id").contents())
        proto.trainer_spec.pad_id = int(field("tokenizer.ggml.padding_token_id").contents())
        proto.trainer_spec.bos_id = -1
        proto.normalizer_spec.add_dummy_prefix = bool(field("tokenizer.ggml.add_space_prefix").contents())
        proto.normalizer_spec.remove_extra_whitespaces = bool(field("tokenizer.ggml.remove_extra_whitespaces").contents())
        proto.normalizer_spec.precompiled_charsmap = bytes(field("tokenizer.ggml.precompiled_charsmap").contents())
        for piece, score, ty in zip(field("tokenizer.ggml.tokens").contents(), field("tokenizer.ggml.scores").contents(),
                                    field("tokenizer.ggml.token_type").contents()):
            p = proto.pieces.add()
            p.piece, p.score, p.type = piece, score, ty
        sp = SentencePieceProcessor(model_proto=proto.SerializeToString())
        expected = json.load(open("tests/fixtures/tokenizers_expected.json"))
        for prompt, ids in expected.items():
            got = sp.encode(prompt) + [1]
            assert got == ids["t5"], (prompt, got, ids["t5"])
    out = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "tokens": len(tokens)}
    json.dump(out, open("tests/fixtures/quantize/t5_tokenizer.json", "w"), indent=1)
    print("tokenizer:", out, f"; SentencePiece from the GGUF reproduces {len(expected)} prompts")


if __name__ == "__main__":
    if sys.argv[1:] == ["tokenizer"]:
        tokenizer_golden()
    else:
        main()
        quantized_q8_0()
        tokenizer_golden()
