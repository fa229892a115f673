#!/usr/bin/env python3
"""Checks Attune's exports with the tools people load them with.

  check_exports.py --expect expect.json [--gguf FILE] [--lora FILE] [--hf DIR]

--gguf   PyPI's `gguf` package reads every metadata key and tensor of a model GGUF; the
         architecture, chat template, EOS id, vocabulary and tensor shapes are what llama.cpp
         expects.
--lora   the same for an adapter GGUF: general.type adapter, adapter.type lora, alpha, and
         lora_a / lora_b pairs of matching rank.
--hf     transformers loads the folder (AutoTokenizer, AutoModelForCausalLM, f32, CPU): its chat
         template renders the same text as Attune's for every check prompt, its tokenizer gives
         the same ids, generation_config.json holds the EOS ids, and greedy decoding reads
         Attune's answers back: at every answer position the most likely token is Attune's.

expect.json (written by the Rust test): {"template", "eos_ids", "vocab_size", "n_layers",
"prompts": [{"messages", "text", "prompt_ids", "answer_ids"}]}.

Prints one line per check; exits 1 if any failed.
"""
import argparse
import json
import sys

failures = []


def check(ok, what):
    print(("ok   " if ok else "FAIL ") + what, flush=True)
    if not ok:
        failures.append(what)


def read_gguf(path):
    import gguf

    r = gguf.GGUFReader(path)
    values = {}
    for name, field in r.fields.items():
        values[name] = field.contents()  # raises on anything unreadable
    return r, values


def check_model_gguf(path, ex):
    r, v = read_gguf(path)
    check(True, f"gguf {gguf_version()} read all {len(v)} metadata keys of {path}")
    arch = v.get("general.architecture")
    check(arch == "llama", f"general.architecture = {arch!r}")
    check(v.get("general.type") == "model", f"general.type = {v.get('general.type')!r}")
    check(v.get("tokenizer.chat_template") == ex["template"], "tokenizer.chat_template is Attune's template")
    check(v.get("tokenizer.ggml.eos_token_id") in ex["eos_ids"], f"tokenizer.ggml.eos_token_id = {v.get('tokenizer.ggml.eos_token_id')}")
    n_tok = len(v.get("tokenizer.ggml.tokens") or [])
    check(n_tok == ex["vocab_size"], f"{n_tok} tokens (vocabulary {ex['vocab_size']})")
    check(len(v.get("tokenizer.ggml.merges") or []) > 0, "BPE merges present")
    for key in ["block_count", "context_length", "embedding_length", "feed_forward_length",
                "attention.head_count", "attention.head_count_kv", "rope.freq_base",
                "attention.layer_norm_rms_epsilon", "rope.dimension_count"]:
        check(f"llama.{key}" in v, f"llama.{key} = {v.get('llama.' + key)}")
    names = {t.name: t for t in r.tensors}
    check(v.get("llama.block_count") == ex["n_layers"], "block count")
    want = ["token_embd.weight", "output_norm.weight"] + [
        f"blk.{i}.{n}.weight" for i in range(ex["n_layers"])
        for n in ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
    ]
    missing = [n for n in want if n not in names]
    check(not missing, f"{len(names)} tensors, every llama tensor present {missing[:3]}")
    emb = names["token_embd.weight"]
    check(int(emb.shape[1]) == ex["vocab_size"], f"token_embd ne = {list(map(int, emb.shape))}")
    types = sorted({t.tensor_type.name for t in r.tensors})
    print(f"     tensor types: {', '.join(types)}")


def check_lora_gguf(path, ex):
    r, v = read_gguf(path)
    check(True, f"gguf {gguf_version()} read all {len(v)} metadata keys of {path}")
    check(v.get("general.type") == "adapter", f"general.type = {v.get('general.type')!r}")
    check(v.get("adapter.type") == "lora", f"adapter.type = {v.get('adapter.type')!r}")
    check(v.get("general.architecture") == "llama", f"general.architecture = {v.get('general.architecture')!r}")
    alpha = v.get("adapter.lora.alpha")
    check(isinstance(alpha, float) and alpha > 0, f"adapter.lora.alpha = {alpha}")
    names = {t.name: t for t in r.tensors}
    pairs = {n[: -len(".lora_a")] for n in names if n.endswith(".lora_a")}
    ok = bool(pairs) and all(p + ".lora_b" in names for p in pairs) and len(names) == 2 * len(pairs)
    check(ok, f"{len(pairs)} lora_a / lora_b pairs")
    ranks = {int(names[p + ".lora_a"].shape[1]) for p in pairs} | {int(names[p + ".lora_b"].shape[0]) for p in pairs}
    check(len(ranks) == 1, f"one rank: {sorted(ranks)}")


def gguf_version():
    import gguf
    try:
        from importlib.metadata import version
        return version("gguf")
    except Exception:
        return getattr(gguf, "__version__", "?")


def check_hf(path, ex):
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(path)
    check(True, f"transformers {transformers.__version__} loads the tokenizer of {path}")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    check(True, f"transformers loads the model ({sum(p.numel() for p in model.parameters())} parameters)")
    gen = json.load(open(f"{path}/generation_config.json"))
    eos = gen.get("eos_token_id")
    eos = eos if isinstance(eos, list) else [eos]
    check(all(e in eos for e in ex["eos_ids"]), f"generation_config.json eos_token_id = {eos}")
    agree = total = 0
    first = None
    for i, p in enumerate(ex["prompts"]):
        text = tok.apply_chat_template(p["messages"], tokenize=False, add_generation_prompt=True)
        check(text == p["text"], f"prompt {i + 1}: the chat template renders Attune's text")
        ids = tok(text, add_special_tokens=False)["input_ids"]
        check(ids == p["prompt_ids"], f"prompt {i + 1}: the tokenizer gives Attune's {len(ids)} ids")
        seq = torch.tensor([p["prompt_ids"] + p["answer_ids"]])
        with torch.no_grad():
            logits = model(seq).logits[0]
        n = len(p["prompt_ids"])
        for k, want in enumerate(p["answer_ids"]):
            got = int(torch.argmax(logits[n - 1 + k]))
            total += 1
            if got == want:
                agree += 1
            elif first is None:
                first = (i + 1, k + 1, want, got)
    detail = f"{agree} of {total} answer tokens"
    if first:
        detail += f"; first difference: prompt {first[0]}, step {first[1]} (Attune {first[2]}, transformers {first[3]})"
    check(agree == total, f"greedy tokens (teacher forcing on Attune's answers): {detail}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--expect", required=True)
    ap.add_argument("--gguf")
    ap.add_argument("--lora")
    ap.add_argument("--hf")
    a = ap.parse_args()
    ex = json.load(open(a.expect))
    if a.gguf:
        check_model_gguf(a.gguf, ex)
    if a.lora:
        check_lora_gguf(a.lora, ex)
    if a.hf:
        check_hf(a.hf, ex)
    if failures:
        print(f"{len(failures)} check(s) failed", flush=True)
        sys.exit(1)
    print("all checks passed")


if __name__ == "__main__":
    main()
