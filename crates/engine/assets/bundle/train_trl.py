#!/usr/bin/env python3
"""Train an Attune run with Hugging Face TRL's SFTTrainer (PEFT for LoRA and prompt tuning).

Written by Attune's `attune runs export`; every setting comes from `attune_run.json` beside this
file (Attune's RunSpec and what it maps to), the data from `data/*.jsonl` (chat messages, or
`text` rows), the chat template from `chat_template.jinja`. Launch it with `accelerate launch`
(see README.md, or `./run.sh`). The result lands in `output/`: `adapter/` (PEFT) or `model/`
(a full fine-tune), `trainer_state.json` (the training log) and `attune_result.json` (the
provenance `attune runs import-result` checks).
"""

import argparse
import json
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def log(msg):
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[attune-bundle] {msg}", file=sys.stderr, flush=True)


def read_jsonl(path):
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                sys.exit(f"{path} line {n}: not JSON ({e})")
    return rows


def model_source(run, override):
    """(name_or_path, from_pretrained kwargs) for the model, as attune_run.json names it."""
    m = run["model"]
    kwargs = {}
    if override:
        src = override
    elif m.get("local_path") and os.path.exists(m["local_path"]):
        src = m["local_path"]
    elif m.get("hub_repo"):
        src = m["hub_repo"]
        if m.get("revision"):
            kwargs["revision"] = m["revision"]
        if m.get("gguf_file"):
            kwargs["gguf_file"] = m["gguf_file"]
        return src, kwargs
    else:
        sys.exit(
            f"the model is not here: {m.get('local_path')!r} does not exist and Attune knows no "
            "Hub repository for it; copy it over and pass --model PATH (a GGUF file or a "
            "Hugging Face folder) or set ATTUNE_MODEL"
        )
    if os.path.isfile(src) and src.endswith(".gguf"):
        kwargs["gguf_file"] = os.path.basename(src)
        src = os.path.dirname(os.path.abspath(src))
    return src, kwargs


def attune_lr_factor(run, n):
    """Attune's schedule (attune_models::train::optim::Schedule::lr) for optimizer step n
    (1-based), as a fraction of the peak: linear warm-up, then constant, linear or cosine decay
    to final_lr_fraction at total_steps."""
    s = run["hyperparameters"]
    w, total, f = s["warmup_steps"], max(s["total_steps"], 1), s["final_lr_fraction"]
    if w > 0 and n <= w:
        return n / w
    span = max(total - w, 1)
    progress = min(max(n - w, 0) / span, 1.0)
    kind = s["schedule"]
    if kind == "constant":
        return 1.0
    if kind == "linear":
        return f + (1.0 - f) * (1.0 - progress)
    return f + (1.0 - f) * 0.5 * (1.0 + math.cos(math.pi * progress))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.environ.get("ATTUNE_MODEL"),
                    help="the model: a GGUF file, a Hugging Face folder or a Hub repo id "
                         "(default: attune_run.json's)")
    ap.add_argument("--output-dir", default=os.path.join(HERE, "output"))
    ap.add_argument("--stop-after", type=int, default=None,
                    help="stop after N optimizer steps (a smoke test); the schedule still "
                         "spans the run's total_steps")
    ap.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                    help="auto: bf16 autocast on a GPU that has it, fp32 elsewhere")
    ap.add_argument("--deepspeed", default=None,
                    help="a DeepSpeed JSON (deepspeed/zero2.json, deepspeed/zero3.json) when "
                         "not launched with an accelerate DeepSpeed config")
    ap.add_argument("--limit-eval", type=int, default=None, help="evaluate on at most N rows")
    ap.add_argument("--save-base", default=None, metavar="DIR",
                    help="write the base model (a GGUF dequantized to f32) and its tokenizer "
                         "as a Hugging Face folder for engines that cannot read a GGUF "
                         "(Axolotl), then exit")
    args = ap.parse_args()

    with open(os.path.join(HERE, "attune_run.json"), encoding="utf-8") as f:
        run = json.load(f)
    with open(os.path.join(HERE, "bundle.json"), encoding="utf-8") as f:
        bundle = json.load(f)
    hp = run["hyperparameters"]
    method = hp["method"]

    import torch
    import transformers
    import trl
    import peft
    import accelerate
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    src, load_kwargs = model_source(run, args.model)
    log(f"model: {src} {load_kwargs}")
    tok = AutoTokenizer.from_pretrained(src, **load_kwargs)
    with open(os.path.join(HERE, "chat_template.jinja"), encoding="utf-8") as f:
        tok.chat_template = f.read()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    # f32 weights always (a GGUF is dequantized); bf16 runs as autocast over them.
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, **load_kwargs)
    model.config.use_cache = False
    if getattr(model, "hf_quantizer", None) is not None and "gguf_file" in load_kwargs:
        # transformers dequantizes a GGUF to dense f32 weights on load but keeps its GGUF
        # "quantizer" as a label, which the Trainer refuses to train; the weights are plain
        # tensors, the same ones Attune trains on, so drop the label.
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    if args.save_base:
        model.save_pretrained(args.save_base)
        tok.save_pretrained(args.save_base)
        log(f"base model written to {args.save_base}")
        return

    # Rows to token ids and labels by Attune's own rule (attune_models::train::render_chat):
    # the whole conversation rendered once; each assistant turn is trained from the token after
    # its header (the rendering of the turns before it with the generation prompt) through its
    # end-of-turn token. TRL's `assistant_only_loss` would do the same from `{% generation %}`
    # markers, which this model's template does not have.
    eos_ids = set(run["tokens"]["eos_token_ids"])
    end_of_text = run["tokens"]["end_of_text_id"]
    loss_on_all = hp["loss_on"] == "all"

    def encode(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    def prefix_len(prefix_text, full):
        p = encode(prefix_text)
        common = 0
        for a, b in zip(p, full):
            if a != b:
                break
            common += 1
        return len(p) if common == len(p) else common

    def render(messages, gen):
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)

    def tokenize(row):
        if "messages" in row and row["messages"] is not None:
            msgs = row["messages"]
            ids = encode(render(msgs, False))
            target = [loss_on_all] * len(ids)
            if not loss_on_all:
                for i, m in enumerate(msgs):
                    if m["role"] != "assistant":
                        continue
                    start = prefix_len(render(msgs[:i], True), ids)
                    end = min(prefix_len(render(msgs[: i + 1], False), ids), len(ids))
                    if start >= end:
                        continue
                    stop = end
                    for t in range(end - 1, start - 1, -1):
                        if ids[t] in eos_ids:
                            stop = t + 1
                            break
                    for t in range(start, stop):
                        target[t] = True
        else:
            ids = encode(row["text"])
            if end_of_text is not None:
                ids.append(end_of_text)
            target = [True] * len(ids)
        return {"input_ids": ids, "labels": [t if m else -100 for t, m in zip(ids, target)]}

    def load_split(name, limit=None):
        path = os.path.join(HERE, "data", f"{name}.jsonl")
        if not os.path.exists(path):
            return None
        rows = read_jsonl(path)[:limit]
        if not rows:
            return None
        return datasets.Dataset.from_list([tokenize(r) for r in rows])

    train = load_split("train")
    if train is None:
        sys.exit("data/train.jsonl has no rows")
    evaluation = load_split("valid", args.limit_eval)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_device = hp["batch_size"]
    if world > 1:
        if hp["batch_size"] % world == 0:
            per_device = hp["batch_size"] // world
        else:
            log(f"batch_size {hp['batch_size']} does not split over {world} processes: each takes "
                f"{per_device} rows, so a step sees {per_device * world} rows per micro-batch")

    use_cuda = torch.cuda.is_available()
    bf16 = args.precision == "bf16" or (
        args.precision == "auto" and use_cuda and torch.cuda.is_bf16_supported()
    )
    config = SFTConfig(
        output_dir=args.output_dir,
        per_device_train_batch_size=per_device,
        per_device_eval_batch_size=per_device,
        gradient_accumulation_steps=hp["grad_accum"],
        max_steps=hp["total_steps"],
        learning_rate=hp["peak_lr"],
        # The schedule actually used is Attune's (create_scheduler below); these name the
        # nearest Hugging Face one for reading.
        lr_scheduler_type=hp["hf_lr_scheduler_type"],
        lr_scheduler_kwargs=hp["hf_lr_scheduler_kwargs"],
        warmup_steps=hp["warmup_steps"],
        weight_decay=hp["weight_decay"],
        max_grad_norm=hp["max_grad_norm"],
        optim="adamw_torch",
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        seed=hp["seed"],
        data_seed=hp["seed"],
        max_length=hp["max_len"],
        truncation_mode="keep_start",
        packing=hp["pack"],
        packing_strategy="wrapped",
        bf16=bf16,
        use_cpu=not use_cuda,
        logging_steps=1,
        logging_first_step=True,
        eval_strategy="steps" if (evaluation is not None and hp["eval_every"] > 0) else "no",
        eval_steps=hp["eval_every"] if hp["eval_every"] > 0 else None,
        save_strategy="steps" if hp["checkpoint_every"] > 0 else "no",
        save_steps=hp["checkpoint_every"] if hp["checkpoint_every"] > 0 else 500,
        save_total_limit=2,
        report_to="none",
        deepspeed=args.deepspeed,
        dataset_num_proc=None,
        remove_unused_columns=True,
    )

    peft_config = None
    if method == "lora":
        lo = hp["lora"]
        peft_config = peft.LoraConfig(
            task_type="CAUSAL_LM",
            r=lo["r"],
            lora_alpha=lo["alpha"],
            lora_dropout=lo["dropout"],
            target_modules=lo["targets"],
            use_rslora=lo["rslora"],
            bias="none",
        )
    elif method == "prompt":
        pr = hp["prompt"]
        kw = dict(task_type="CAUSAL_LM", num_virtual_tokens=pr["virtual_tokens"])
        if pr.get("init_text"):
            kw.update(prompt_tuning_init=peft.PromptTuningInit.TEXT,
                      prompt_tuning_init_text=pr["init_text"], tokenizer_name_or_path=src,
                      tokenizer_kwargs=load_kwargs or None)
        else:
            # Attune starts the soft prompt from random vocabulary rows: PEFT's SAMPLE_VOCAB.
            kw.update(prompt_tuning_init=peft.PromptTuningInit.SAMPLE_VOCAB)
        peft_config = peft.PromptTuningConfig(**kw)

    class StopAfter(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            if args.stop_after is not None and state.global_step >= args.stop_after:
                control.should_training_stop = True
            return control

    class AttuneSFTTrainer(SFTTrainer):
        def create_scheduler(self, num_training_steps, optimizer=None):
            # Hugging Face's schedulers use lr(0) for the first update; Attune's uses lr(1).
            if self.lr_scheduler is None:
                opt = optimizer if optimizer is not None else self.optimizer
                self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                    opt, lambda s: attune_lr_factor(run, s + 1))
                self._created_lr_scheduler = True
            return self.lr_scheduler

    trainer = AttuneSFTTrainer(
        model=model,
        args=config,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tok,
        peft_config=peft_config,
        callbacks=[StopAfter()],
    )
    trainer.train()
    eval_loss = None
    if evaluation is not None:
        eval_loss = trainer.evaluate().get("eval_loss")
    out = args.output_dir
    kind = method if method != "full" else "full"
    sub = os.path.join(out, "model" if method == "full" else "adapter")
    trainer.save_model(sub)
    if method == "full" and trainer.is_world_process_zero():
        tok.save_pretrained(sub)
    trainer.save_state()
    if trainer.is_world_process_zero():
        first = next((h for h in trainer.state.log_history if "loss" in h), None)
        result = {
            "bundle_sha256": bundle["sha256"],
            "run": run["run"],
            "engine": "trl",
            "engine_version": f"trl {trl.__version__}",
            "versions": {
                "trl": trl.__version__, "transformers": transformers.__version__,
                "peft": peft.__version__, "accelerate": accelerate.__version__,
                "torch": torch.__version__, "datasets": datasets.__version__,
            },
            "kind": kind,
            "result_dir": os.path.basename(sub),
            "steps": trainer.state.global_step,
            "processes": world,
            "precision": "bf16" if bf16 else "fp32",
            "first_loss": first["loss"] if first else None,
            "eval_loss": eval_loss,
        }
        with open(os.path.join(out, "attune_result.json"), "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
        log(f"done: {trainer.state.global_step} steps, result in {sub}")


if __name__ == "__main__":
    main()
