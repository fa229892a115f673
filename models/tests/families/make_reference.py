#!/usr/bin/env python3
"""Builds the small models of `models/tests/families/` and their PyTorch reference figures.

For each architecture Attune runs besides the default llama (qwen3, gemma3, phi3, llama 3.x rope
scaling, smollm3) this script builds, with transformers, a small model from a config with seeded
random weights, saves it as a Hugging Face folder (safetensors) and converts it to GGUF the way
llama.cpp's `convert_hf_to_gguf.py` does (PyPI's `gguf` package writes it), and computes with
PyTorch in float32:

- the logits of three prompts (top-10 at the last position, mean NLL), the chat template's
  rendering of a conversation and its token ids, and a greedy generation (KV cache);
- the same with a PEFT LoRA adapter (random A and B, so B is far from zero);
- the first two optimizer steps of each training method (full fine-tuning, LoRA from a saved
  initial A, prompt tuning from text) on one batch: losses and pre-clip gradient norms.

The tokenizer is a real one cut small: SmolLM2's byte-level BPE (read from the default model's
GGUF metadata) keeping its first 1024 tokens and the merges that make them, plus the family's
own special tokens (the chat template of each family needs them). Weights are rounded to
bfloat16 and stored as bfloat16 (safetensors and GGUF), so both files hold exactly the values
PyTorch computes with (in float32), and the files stay small.

Cross-checks (the script fails when one fails): the tokenizer that Attune builds from GGUF
metadata is emulated by loading the GGUF with transformers where transformers can read the
architecture (llama, qwen3, phi3, gemma3): its logits must equal the safetensors model's.

Usage (the venv of `../shared/reference/harness/setup.sh`: torch, transformers, peft, gguf):
    python models/tests/families/make_reference.py [--default-gguf PATH] [--out DIR]
Deterministic: the same versions give the same files byte for byte.
"""

import argparse
import json
import math
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

import gguf
import transformers
import peft
from tokenizers import AddedToken, Tokenizer, decoders, models as tok_models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

HERE = Path(__file__).resolve().parent
BASE_TOKENS = 1024  # SmolLM2's first 1024 ids: 17 specials, 235 byte symbols, 772 merges
SEED = 1234

PROMPTS = [
    ("plain", "The sky is blue because of a process called Rayleigh scattering."),
    ("digits", "In 2024, 17 of the 256 samples (6.64%) failed."),
    ("chinese", "天空为什么是蓝色的？"),
]
CHAT = [
    {"role": "system", "content": "You answer in one short sentence."},
    {"role": "user", "content": "Why is the sky blue?"},
]
CHAT_TRAIN = CHAT + [{"role": "assistant", "content": "Air scatters blue light more than red."}]
TRAIN_TEXTS = [
    "Attune adapts a small language model to a domain on your own machine.",
    "The quick brown fox jumps over the lazy dog, twice.",
]
GEN_TOKENS = 24


# ---- the families ---------------------------------------------------------------------------

def families():
    """name -> (transformers config dict, GGUF architecture, family specials, template, LoRA targets)."""
    common = dict(vocab_size=None, hidden_size=64, intermediate_size=128, rms_norm_eps=1e-6,
                  max_position_embeddings=512)
    attn = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return {
        "qwen3": dict(
            config=dict(common, model_type="qwen3", architectures=["Qwen3ForCausalLM"],
                        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=24, rope_theta=1_000_000.0, tie_word_embeddings=True,
                        attention_bias=False, use_sliding_window=False, max_window_layers=3),
            specials=["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>"],
            bos=None, eos="<|im_end|>", pad="<|endoftext|>", add_bos=False,
            template=(HERE / "templates/qwen3.jinja").read_text(),
            targets=attn,
        ),
        "gemma3": dict(
            # 6 layers: llama.cpp's default pattern (5 sliding, then 1 global); a window of 4
            # tokens so every prompt crosses it.
            config=dict(common, model_type="gemma3_text", architectures=["Gemma3ForCausalLM"],
                        num_hidden_layers=6, num_attention_heads=2, num_key_value_heads=1,
                        head_dim=32, query_pre_attn_scalar=32, sliding_window=4,
                        rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
                        hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
                        final_logit_softcapping=None, attn_logit_softcapping=None),
            specials=["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
            bos="<bos>", eos="<end_of_turn>", pad="<pad>", add_bos=True,
            template=(HERE / "templates/gemma3.jinja").read_text(),
            targets=attn,
        ),
        "phi3": dict(
            # Phi-4-mini's shape: grouped-query heads, partial rotary (3/4 of each head), longrope
            # (short factors up to 32 positions, long ones past them), untied head.
            config=dict(common, model_type="phi3", architectures=["Phi3ForCausalLM"],
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=128, original_max_position_embeddings=32,
                        rope_theta=10_000.0, partial_rotary_factor=0.75,
                        rope_scaling=dict(type="longrope",
                                          short_factor=[1.0 + 0.05 * i for i in range(6)],
                                          long_factor=[1.0 + 0.9 * i for i in range(6)]),
                        tie_word_embeddings=False, sliding_window=None, hidden_act="silu",
                        resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0),
            specials=["<unk>", "<s>", "</s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
            # Phi-3's tokenizer.json strips the whitespace after its special tokens but these three
            # (llama.cpp applies the same rule to GGUF files named Phi-3).
            rstrip_except=["<unk>", "<s>", "<|endoftext|>"],
            bos="<s>", eos="<|end|>", pad="<|endoftext|>", add_bos=False,
            template=(HERE / "templates/phi3.jinja").read_text(),
            targets=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
        ),
        "llama3": dict(
            # Llama 3.2's rope scaling, with a small original context so it changes short prompts
            # (two frequencies in its smooth band, as in Llama 3.x, where there are several).
            config=dict(common, model_type="llama", architectures=["LlamaForCausalLM"],
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        rope_theta=10_000.0, tie_word_embeddings=True,
                        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                          high_freq_factor=4.0, original_max_position_embeddings=64)),
            specials=[], bos=None, eos="<|im_end|>", pad="<|im_end|>", add_bos=False,
            template=None,  # SmolLM2's (ChatML)
            targets=attn,
        ),
        "smollm3": dict(
            # Every 4th layer without rope (NoPE), as SmolLM3-3B.
            config=dict(common, model_type="smollm3", architectures=["SmolLM3ForCausalLM"],
                        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                        rope_theta=2_000_000.0, tie_word_embeddings=True,
                        no_rope_layer_interval=4, use_sliding_window=False),
            specials=[], bos=None, eos="<|im_end|>", pad="<|im_end|>", add_bos=False,
            template=None,
            targets=attn,
        ),
    }


# ---- tokenizer --------------------------------------------------------------------------------

def gguf_strings(reader, key):
    f = reader.fields[key]
    return [bytes(f.parts[i]).decode("utf-8") for i in f.data]


def gguf_scalar(reader, key):
    f = reader.fields[key]
    v = f.parts[f.data[0]]
    if f.types[0] == gguf.GGUFValueType.STRING:
        return bytes(v).decode("utf-8")
    return v.tolist()[0]


def base_vocabulary(default_gguf):
    r = gguf.GGUFReader(default_gguf)
    tokens = gguf_strings(r, "tokenizer.ggml.tokens")
    merges = gguf_strings(r, "tokenizer.ggml.merges")
    types = [int(r.fields["tokenizer.ggml.token_type"].parts[i][0]) for i in r.fields["tokenizer.ggml.token_type"].data]
    template = gguf_scalar(r, "tokenizer.chat_template")
    assert gguf_scalar(r, "tokenizer.ggml.pre") == "smollm"
    # SmolLM2's merge i makes token 252 + i, so its first K tokens are made by its first K - 252 merges.
    index = {t: i for i, t in enumerate(tokens)}
    for i, m in enumerate(merges[: BASE_TOKENS - 252]):
        assert index[m.replace(" ", "")] == 252 + i, m
    return tokens[:BASE_TOKENS], merges[: BASE_TOKENS - 252], types[:BASE_TOKENS], template


def build_tokenizer(base, fam, out_dir):
    tokens, merges, types, smol_template = base
    tokens = list(tokens)
    types = list(types)
    for s in fam["specials"]:
        if s not in tokens:
            tokens.append(s)
            types.append(3)  # CONTROL
    vocab = {t: i for i, t in enumerate(tokens)}
    bpe = tok_models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges])
    tk = Tokenizer(bpe)
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    tk.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    specials = [t for t, ty in zip(tokens, types) if ty == 3]
    keep = fam.get("rstrip_except")
    tk.add_special_tokens([
        AddedToken(t, special=True, normalized=False, rstrip=keep is not None and t not in keep)
        for t in specials
    ])
    if fam["add_bos"]:
        from tokenizers import processors
        tk.post_processor = processors.TemplateProcessing(
            single=f"{fam['bos']} $A", pair=f"{fam['bos']} $A {fam['bos']} $B",
            special_tokens=[(fam["bos"], vocab[fam["bos"]])])
    template = fam["template"] or smol_template
    kw = dict(eos_token=fam["eos"], pad_token=fam["pad"])
    if fam["bos"]:
        kw["bos_token"] = fam["bos"]
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tk, **kw)
    hf_tok.chat_template = template
    hf_tok.save_pretrained(out_dir)
    return hf_tok, tokens, types, merges, template


# ---- model -----------------------------------------------------------------------------------

def make_config(fam, vocab_size, tok):
    c = dict(fam["config"])
    c["vocab_size"] = vocab_size
    c["bos_token_id"] = tok.convert_tokens_to_ids(fam["bos"]) if fam["bos"] else None
    c["eos_token_id"] = tok.convert_tokens_to_ids(fam["eos"])
    c["pad_token_id"] = tok.convert_tokens_to_ids(fam["pad"])
    model_type = c.pop("model_type")
    c.pop("architectures")
    return transformers.AutoConfig.for_model(model_type, **c)


def randomize(model, gemma):
    """Seeded weights that give distinct logits: linear layers N(0, 1/fan_in), embeddings
    N(0, 0.5), norm scales around 1 (Gemma's (1 + w) norms: w around 0), all rounded to bf16."""
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                base = 0.0 if gemma else 1.0
                v = base + 0.2 * torch.randn(p.shape, generator=g)
            elif "embed_tokens" in name or name == "lm_head.weight":
                # Gemma multiplies the embeddings by sqrt(hidden) = 8.
                v = (0.1 if gemma else 0.5) * torch.randn(p.shape, generator=g)
            else:
                v = torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1])
            p.copy_(v.to(torch.bfloat16).to(torch.float32))


# ---- GGUF (as llama.cpp's convert_hf_to_gguf.py writes these architectures) --------------------

def llama_permute(w, n_head, n_head_kv=None):
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, name, cfg, sd, tok_info, fam_name, fam):
    tokens, types, merges, template, hf_tok = tok_info
    arch = {"qwen3": "qwen3", "gemma3": "gemma3", "phi3": "phi3", "llama3": "llama", "smollm3": "smollm3"}[fam_name]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rp = cfg.rope_parameters
    if fam_name == "gemma3":
        w.add_rope_freq_base(rp["full_attention"]["rope_theta"])
        w.add_rope_freq_base_swa(rp["sliding_attention"]["rope_theta"])
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_sliding_window(cfg.sliding_window)
    else:
        w.add_rope_freq_base(rp["rope_theta"])
        if fam_name == "qwen3":
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
    if fam_name == "phi3":
        rot = int(rp["partial_rotary_factor"] * cfg.hidden_size) // cfg.num_attention_heads
        w.add_rope_dimension_count(rot)
        w.add_rope_scaling_orig_ctx_len(rp["original_max_position_embeddings"])
        w.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
        scale = cfg.max_position_embeddings / rp["original_max_position_embeddings"]
        w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(rp["original_max_position_embeddings"])))
        w.add_sliding_window(0)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_BF16)
    # tokenizer
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    if fam["bos"]:
        w.add_bos_token_id(hf_tok.convert_tokens_to_ids(fam["bos"]))
    w.add_eos_token_id(hf_tok.convert_tokens_to_ids(fam["eos"]))
    w.add_pad_token_id(hf_tok.convert_tokens_to_ids(fam["pad"]))
    w.add_add_bos_token(fam["add_bos"])
    w.add_chat_template(template)

    def tensor(n, t):
        t = t.detach().to(torch.float32).numpy()
        if t.ndim == 1:
            w.add_tensor(n, t.astype(np.float32))
        else:
            q = gguf.quants.quantize(t, gguf.GGMLQuantizationType.BF16)
            w.add_tensor(n, q, raw_dtype=gguf.GGMLQuantizationType.BF16)

    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    permute = fam_name in ("llama3", "smollm3")
    norm_shift = 1.0 if fam_name == "gemma3" else 0.0
    tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    if "lm_head.weight" in sd and not cfg.tie_word_embeddings:
        tensor("output.weight", sd["lm_head.weight"])
    tensor("output_norm.weight", sd["model.norm.weight"] + norm_shift)
    if fam_name == "llama3":
        rs = rp
        base, dim = rs["rope_theta"], head_dim
        freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        factor, lo, hi, old = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"], rs["original_max_position_embeddings"]
        lo_wl, hi_wl = old / lo, old / hi
        f = []
        for fr in freqs.tolist():
            wl = 2 * math.pi / fr
            if wl < hi_wl:
                f.append(1)
            elif wl > lo_wl:
                f.append(factor)
            else:
                s = (old / wl - lo) / (hi - lo)
                f.append(1 / ((1 - s) / factor + s))
        tensor("rope_freqs.weight", torch.tensor(f, dtype=torch.float32))
    if fam_name == "phi3":
        tensor("rope_factors_long.weight", torch.tensor(rp["long_factor"], dtype=torch.float32))
        tensor("rope_factors_short.weight", torch.tensor(rp["short_factor"], dtype=torch.float32))
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        b = f"blk.{i}."
        tensor(b + "attn_norm.weight", sd[p + "input_layernorm.weight"] + norm_shift)
        if fam_name == "phi3":
            tensor(b + "attn_qkv.weight", sd[p + "self_attn.qkv_proj.weight"])
            tensor(b + "ffn_up.weight", sd[p + "mlp.gate_up_proj.weight"])
        else:
            q, k = sd[p + "self_attn.q_proj.weight"], sd[p + "self_attn.k_proj.weight"]
            if permute:
                q, k = llama_permute(q, nh, nh), llama_permute(k, nh, nkv)
            tensor(b + "attn_q.weight", q)
            tensor(b + "attn_k.weight", k)
            tensor(b + "attn_v.weight", sd[p + "self_attn.v_proj.weight"])
            tensor(b + "ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
            tensor(b + "ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        tensor(b + "attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        tensor(b + "ffn_down.weight", sd[p + "mlp.down_proj.weight"])
        if fam_name in ("qwen3", "gemma3"):
            tensor(b + "attn_q_norm.weight", sd[p + "self_attn.q_norm.weight"] + norm_shift)
            tensor(b + "attn_k_norm.weight", sd[p + "self_attn.k_norm.weight"] + norm_shift)
        if fam_name == "gemma3":
            tensor(b + "post_attention_norm.weight", sd[p + "post_attention_layernorm.weight"] + norm_shift)
            tensor(b + "ffn_norm.weight", sd[p + "pre_feedforward_layernorm.weight"] + norm_shift)
            tensor(b + "post_ffw_norm.weight", sd[p + "post_feedforward_layernorm.weight"] + norm_shift)
        else:
            tensor(b + "ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# ---- reference figures ------------------------------------------------------------------------

def top10(logits):
    v, i = torch.topk(logits, 10)
    return [[int(a), round(float(b), 6)] for a, b in zip(i, v)]


def score(model, ids, **kw):
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), **kw).logits[0].float()
    lsm = torch.log_softmax(out, -1)
    nll = -lsm[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].mean().item()
    return out, nll


def greedy(model, ids, eos_ids):
    """Greedy decoding with the KV cache; each step's top-2 margin tells how safe a comparison is."""
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=GEN_TOKENS, do_sample=False,
                             output_scores=True, return_dict_in_generate=True, eos_token_id=eos_ids,
                             pad_token_id=eos_ids[0])
    new = out.sequences[0, len(ids):].tolist()
    margins, steps = [], []
    for s in out.scores:
        t = torch.topk(s[0].float(), 2).values
        margins.append(round(float(t[0] - t[1]), 6))
        steps.append(top10(s[0].float()))
    return new, margins, steps


def train_reference(model_dir, fam, tok, batch, method, lora_init_dir=None):
    """Two AdamW steps on `batch`; returns losses and pre-clip gradient norms."""
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    model.train()
    ids, labels, mask = batch
    if method["method"] == "full":
        params = [p for p in model.parameters()]
    elif method["method"] == "lora":
        cfg = peft.LoraConfig(r=method["r"], lora_alpha=method["alpha"], lora_dropout=0.0,
                              target_modules=fam["targets"], bias="none", task_type="CAUSAL_LM")
        model = peft.get_peft_model(model, cfg)
        model.save_pretrained(lora_init_dir)  # A as PEFT draws it, B zero
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        cfg = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=method["num_virtual_tokens"],
                                      prompt_tuning_init=peft.PromptTuningInit.TEXT,
                                      prompt_tuning_init_text=method["init_text"],
                                      tokenizer_name_or_path=str(model_dir))
        model = peft.get_peft_model(model, cfg)
        params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=method["lr"], betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    losses, norms = [], []
    for _ in range(2):
        opt.zero_grad()
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        if method["method"] == "prompt":
            logits = logits[:, method["num_virtual_tokens"]:]
        lsm = torch.log_softmax(logits[:, :-1], -1)
        tgt = labels[:, 1:]
        keep = tgt != -100
        nll = -lsm.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)[keep]
        loss = nll.sum() / keep.sum()
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(round(loss.item(), 6))
        norms.append(round(gn.item(), 6))
    return dict(method, losses=losses, grad_norm_preclip=norms)


def build(fam_name, fam, base, out_root, default_gguf):
    out = out_root / fam_name
    if out.exists():
        shutil.rmtree(out)
    hf_dir = out / "hf"
    hf_dir.mkdir(parents=True)
    hf_tok, tokens, types, merges, template = build_tokenizer(base, fam, hf_dir)
    cfg = make_config(fam, len(tokens), hf_tok)
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    randomize(model, gemma=fam_name == "gemma3")
    model.generation_config.eos_token_id = cfg.eos_token_id
    model.to(torch.bfloat16).save_pretrained(hf_dir)
    sd = {k: v.float() for k, v in model.state_dict().items()}
    gguf_path = out / "model.gguf"
    write_gguf(gguf_path, f"tiny-{fam_name}", cfg, sd, (tokens, types, merges, template, hf_tok), fam_name, fam)

    # Reference in float32 from the saved files.
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    tok = PreTrainedTokenizerFast.from_pretrained(hf_dir)
    eos_ids = [cfg.eos_token_id]
    ref = dict(family=fam_name, gguf_architecture=gguf.GGUFReader(gguf_path).fields["general.architecture"].parts[-1].tobytes().decode(),
               versions=dict(torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__),
               vocab_size=len(tokens), eos_token_id=cfg.eos_token_id, lora_targets=fam["targets"], prompts=[])
    for name, text in PROMPTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        logits, nll = score(model, ids)
        ref["prompts"].append(dict(name=name, text=text, token_ids=ids, top10_last=top10(logits[-1]), mean_nll=round(nll, 6)))
    rendered = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    chat_ids = tok.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True, return_dict=False)
    if isinstance(chat_ids, dict):
        chat_ids = chat_ids["input_ids"]
    logits, nll = score(model, chat_ids)
    ref["chat"] = dict(messages=CHAT, rendered=rendered, token_ids=list(chat_ids),
                       rendered_with_answer=tok.apply_chat_template(CHAT_TRAIN, tokenize=False),
                       top10_last=top10(logits[-1]), mean_nll=round(nll, 6))
    new, margins, steps = greedy(model, list(chat_ids), eos_ids)
    ref["generate"] = dict(prompt_ids=list(chat_ids), new_ids=new, top2_margins=margins, step_top10=steps)

    # A PEFT LoRA adapter with random A and B (r=4, alpha=8) and the logits it gives.
    lcfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=fam["targets"], bias="none",
                           task_type="CAUSAL_LM")
    pm = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32,
                                                                  attn_implementation="eager"), lcfg)
    g = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for n, p in sorted(pm.named_parameters()):
            if "lora_" in n:
                p.copy_((0.3 * torch.randn(p.shape, generator=g)).to(torch.bfloat16).float())
    pm.eval()
    pm.save_pretrained(out / "lora")
    ref["lora"] = dict(dir="lora", r=4, alpha=8, prompts=[])
    for name, text in PROMPTS[:2] + [("chat", None)]:
        ids = list(chat_ids) if text is None else tok(text, add_special_tokens=False)["input_ids"]
        logits, nll = score(pm, ids)
        ref["lora"]["prompts"].append(dict(name=name, token_ids=ids, top10_last=top10(logits[-1]), mean_nll=round(nll, 6)))

    # Training: one batch of the two texts, each followed by <|endoftext|> (as Attune renders text
    # rows), right-padded; loss on every real token.
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    rows = [tok(t, add_special_tokens=False)["input_ids"] + [eot] for t in TRAIN_TEXTS]
    width = max(len(r) for r in rows)
    pad = cfg.pad_token_id
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    labels = torch.tensor([r + [-100] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    batch = (ids, labels, mask)
    ref["train"] = dict(rows=rows, pad_id=pad, clip=1.0, methods=[
        train_reference(hf_dir, fam, tok, batch, dict(method="full", lr=1e-3)),
        train_reference(hf_dir, fam, tok, batch, dict(method="lora", lr=1e-2, r=4, alpha=8, init_dir="lora_init"),
                        lora_init_dir=out / "lora_init"),
        train_reference(hf_dir, fam, tok, batch, dict(method="prompt", lr=1e-1, num_virtual_tokens=4,
                                                      init_text="Answer briefly.")),
    ])

    # Cross-check the GGUF against the safetensors model where transformers reads the architecture.
    if fam_name != "smollm3":
        # The HF config is passed in: transformers' GGUF reader maps fewer metadata keys than
        # llama.cpp (no head_dim for qwen3, no longrope for phi3); the tensors' names, Q/K
        # permutation and norm shifts are what this checks.
        gm = AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf", config=model.config,
                                                  dtype=torch.float32, attn_implementation="eager")
        gm.eval()
        ids = ref["prompts"][0]["token_ids"]
        a, _ = score(model, ids)
        b, _ = score(gm, ids)
        diff = (a - b).abs().max().item()
        ref["gguf_crosscheck"] = dict(reader="transformers", max_abs_logit_diff=diff)
        if diff > 1e-3:
            print(f"{fam_name}: transformers reads model.gguf with logits {diff} away", file=sys.stderr)
            sys.exit(1)
    else:
        ref["gguf_crosscheck"] = dict(reader="none (transformers has no smollm3 GGUF reader)")

    for d in [out / "lora", out / "lora_init"]:
        for f in ["README.md", "training_args.bin"]:
            if (d / f).exists():
                (d / f).unlink()
        # Byte-for-byte reproducible: no absolute path, target modules in order (PEFT keeps a set).
        cfg_path = d / "adapter_config.json"
        acfg = json.loads(cfg_path.read_text())
        acfg["base_model_name_or_path"] = "../hf"
        acfg["target_modules"] = sorted(acfg["target_modules"])
        cfg_path.write_text(json.dumps(acfg, indent=2, sort_keys=True) + "\n")
    (out / "reference.json").write_text(compact_json(ref) + "\n")
    print(f"{fam_name}: {sum(p.numel() for p in model.parameters())} parameters, "
          f"min top-2 margin in generation {min(margins):.4f}, files in {out}")


def compact_json(v, indent=0):
    """JSON with one line per list of numbers (the files stay readable in a diff)."""
    pad = " " * indent
    if isinstance(v, dict):
        items = [f'{pad} {json.dumps(k)}: {compact_json(x, indent + 1).lstrip()}' for k, x in v.items()]
        return pad + "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(v, list) and v and not all(isinstance(x, (int, float)) for x in v) \
            and not all(isinstance(x, list) and all(isinstance(y, (int, float)) for y in x) for x in v):
        return pad + "[\n" + ",\n".join(compact_json(x, indent + 1) for x in v) + "\n" + pad + "]"
    return pad + json.dumps(v, ensure_ascii=False)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--default-gguf", default=os.path.expanduser(
        os.environ.get("ATTUNE_TEST_MODEL", "~/.local/share/attune/models/SmolLM2-135M-Instruct.Q4_1.gguf")))
    ap.add_argument("--out", default=str(HERE))
    ap.add_argument("--only", default=None, help="comma-separated family names")
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    base = base_vocabulary(args.default_gguf)
    fams = families()
    names = args.only.split(",") if args.only else list(fams)
    for n in names:
        build(n, fams[n], base, Path(args.out), args.default_gguf)


if __name__ == "__main__":
    main()
