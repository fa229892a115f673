#!/usr/bin/env python3
"""TRL's DPOTrainer (or, with --trainer orpo, its ORPOTrainer) on the default model: the
reference figures of Attune's DPO and ORPO parity tests.

Runs PyPI's trl (scripts/setup-trl.sh prints the interpreter) on the first rows of
tests/data/prefs-sample.jsonl (conversational prompt/chosen/rejected) with LoRA (r=8, alpha=16,
the seven projections, no dropout) on SmolLM2-135M-Instruct loaded from its Q4_1 GGUF
(transformers dequantizes it to float32, as shared/reference/README.md describes), for a few
optimizer steps, and writes what TRL logs per step: loss, rewards/chosen, rewards/rejected,
rewards/margins, rewards/accuracies, logps/chosen, logps/rejected and grad_norm (before clipping).

The reference model is TRL's own choice for a PEFT model: the same model with the adapter
disabled. PEFT draws lora_A from torch's RNG, which Attune cannot reproduce, so both sides set
lora_A to the same formula (`lora_a_value`); lora_B starts at zero as in PEFT.

ORPO (`trl.experimental.orpo.ORPOTrainer`) needs no reference model; it tokenizes differently
from DPOTrainer (the chat-formatted prompt and answer as strings, BOS/EOS added when missing), so
its tokenized rows carry the label mask too, and the Rust test trains on those very ids.

Usage: $(scripts/setup-trl.sh) scripts/reference_dpo.py [--trainer dpo|orpo] [--gguf PATH] [--out FILE]
(default FILE: models/tests/data/dpo_reference.json, or orpo_reference.json for ORPO)
"""
import argparse
import json
import math
import os
import sys

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_a_value(layer, module, k, fan_in):
    """The k-th element (row-major [r, in]) of lora_A of `module` (index in TARGETS) in `layer`:
    within PEFT's Kaiming-uniform bound 1/sqrt(fan_in). Attune's test computes the same."""
    return math.sin(0.37 * k + 1.3 * layer + 2.1 * module + 0.5) / math.sqrt(fan_in)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", default=os.path.expanduser(
        "~/.local/share/attune/models/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "tests", "data",
                                                   "prefs-sample.jsonl"))
    ap.add_argument("--trainer", choices=["dpo", "orpo"], default="dpo")
    ap.add_argument("--out", default=None)
    ap.add_argument("--rows", type=int, default=6)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.out is None:
        args.out = os.path.join(os.path.dirname(__file__), "..", "models", "tests", "data",
                                f"{args.trainer}_reference.json")

    import numpy as np
    import torch
    import trl
    import peft
    import transformers
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from transformers.utils import logging as hf_logging
    from trl import DPOConfig, DPOTrainer

    hf_logging.disable_progress_bar()
    os.environ.setdefault("TQDM_DISABLE", "1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(42)

    d, f = os.path.dirname(os.path.abspath(args.gguf)), os.path.basename(args.gguf)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32,
                                                 attn_implementation="eager")
    # The weights are plain float32 tensors once loaded; transformers still marks the model as
    # GGUF-quantized, which its Trainer refuses to train.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    rows = [json.loads(line) for line in open(args.data, encoding="utf-8") if line.strip()][: args.rows]
    ds = Dataset.from_list(rows)

    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                             target_modules=TARGETS, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_A" not in name:
                continue
            parts = name.split(".")
            layer = int(parts[parts.index("layers") + 1])
            module = TARGETS.index(next(t for t in TARGETS if f".{t}." in name))
            r, fan_in = p.shape
            k = np.arange(r * fan_in, dtype=np.float64)
            vals = np.sin(0.37 * k + 1.3 * layer + 2.1 * module + 0.5) / math.sqrt(fan_in)
            p.copy_(torch.from_numpy(vals.astype(np.float32)).reshape(r, fan_in))

    logs = []

    class Keep(TrainerCallback):
        def on_log(self, _args, state, control, logs=None, **kw):
            if logs is not None and "loss" in logs:
                logs = dict(logs)
                logs["step"] = state.global_step
                logs_list.append(logs)

    logs_list = logs

    if args.trainer == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer
        Base, Config, extra = ORPOTrainer, ORPOConfig, {}
    else:
        Base, Config, extra = DPOTrainer, DPOConfig, {"loss_type": ["sigmoid"]}

    class Sequential(Base):
        def _get_train_sampler(self, *a, **k):
            return SequentialSampler(self.train_dataset)

    cfg = Config(
        output_dir="/tmp/attune-reference-dpo",
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1,
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        max_grad_norm=1.0,
        beta=args.beta,
        **extra,
        max_length=1024,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=42,
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        dataloader_num_workers=0,
    )
    trainer = Sequential(model=model, args=cfg, train_dataset=ds, processing_class=tok,
                         callbacks=[Keep()])
    # The tokenized rows, so the Rust side can check its tokenization first.
    if args.trainer == "orpo":
        # Whole sequences with their labels (-100: not scored).
        tokenized = [{"prompt_ids": r["prompt_input_ids"],
                      "chosen_input_ids": r["chosen_input_ids"], "chosen_labels": r["chosen_labels"],
                      "rejected_input_ids": r["rejected_input_ids"],
                      "rejected_labels": r["rejected_labels"]} for r in trainer.train_dataset]
    else:
        tokenized = [{"prompt_ids": r["prompt_ids"], "chosen_ids": r["chosen_ids"],
                      "rejected_ids": r["rejected_ids"]} for r in trainer.train_dataset]
    trainer.train()

    keys = ["loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/margins",
            "rewards/accuracies", "logps/chosen", "logps/rejected", "nll_loss", "log_odds_ratio",
            "log_odds_chosen"]
    steps = [{k: float(l[k]) for k in keys if k in l} | {"step": l["step"]} for l in logs]
    out = {
        "about": f"TRL {Base.__name__}, first steps on tests/data/prefs-sample.jsonl; written by "
                 f"scripts/reference_dpo.py --trainer {args.trainer}",
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__, "torch": torch.__version__},
        "gguf": os.path.basename(args.gguf),
        "settings": {"rows": args.rows, "batch": args.batch, "steps": args.steps, "lr": args.lr,
                     "beta": args.beta, "trainer": args.trainer,
                     "loss_type": "sigmoid" if args.trainer == "dpo" else "orpo", "schedule": "constant",
                     "weight_decay": 0.0, "max_grad_norm": 1.0, "lora_r": 8, "lora_alpha": 16,
                     "targets": TARGETS, "lora_a": "sin(0.37 k + 1.3 layer + 2.1 module + 0.5) / sqrt(in)",
                     "order": "sequential"},
        "tokenized": tokenized,
        "steps": steps,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as fo:
        json.dump(out, fo, indent=1)
        fo.write("\n")
    print(json.dumps(steps, indent=1))


if __name__ == "__main__":
    sys.exit(main())
