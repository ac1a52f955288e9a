"""The trl worker (its venv: torch, trl, transformers, accelerate, datasets): TRL's GKDTrainer (Generalized Knowledge
Distillation, Agarwal et al. 2024) on kdistill's instruction rows, the way a TRL user writes it: a `messages` dataset,
a teacher and a student model, a GKDConfig.

train job: teacher (an HF causal LM dir: the teacher kdistill loaded, saved), student (an HF causal LM dir: the
student kdistill starts from, saved before any training), data (the exported dir: train.jsonl, one
{"messages": [prompt turns..., {"role": "assistant", "content": gold or teacher response}]} a line), out, budget
(trl_peer.budget: steps, batch_size, grad_accum, lr, warmup_steps, weight_decay, max_grad_norm, seed,
max_prompt_tokens, max_response_tokens, beta, lmbda), stop_ids (where a sampled response ends). Per micro-batch
(batch_size / grad_accum rows), as GKDTrainer does it: with probability lmbda the student samples its own responses
to the rows' prompts (T = 1, full vocabulary, at most max_response_tokens) and those are the targets, else the rows'
responses are; the loss is the generalized JSD(beta) between the teacher's and the student's next-token
distributions on the target tokens (beta 0: forward KL, 1: reverse KL), summed, divided by the step's count.
Writes out/model (the trained student and its tokenizer); the harness scores it with kdistill's own generation and
scorer.

Counted (a subclass that only counts, the training is GKDTrainer's own): the target tokens of every micro-batch
(labels != -100 after the causal shift: the tokens the loss is summed over, generated ones on an on-policy one), the
micro-batches and the on-policy ones, and what the loss was divided by (transformers passes num_items_in_batch, the
targets of the rows the step loaded, before GKD swaps in generated ones).
"""

from __future__ import annotations

import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import main, read_jsonl, use_threads, versions  # noqa: E402

IGNORE = -100
"""The label of a position the loss skips (prompt, padding), as TRL's collator writes it."""


def gkd_config(b: dict, output_dir: str):
    """The GKDConfig of kdistill's budget `b`: its steps, batch and micro-batches, optimizer and schedule, in fp32 on
    the CPU, no gradient checkpointing (kdistill's defaults), no checkpoints or reports; generation and loss as
    kdistill's GKD: samples at T = 1 from the full vocabulary, at most max_response_tokens; the collator keeps the
    last max_prompt_tokens + max_response_tokens tokens of a row (kdistill cuts a prompt from the left, too)."""
    from trl.experimental.gkd import GKDConfig

    return GKDConfig(
        output_dir=output_dir, max_steps=b["steps"], per_device_train_batch_size=b["batch_size"] // b["grad_accum"],
        gradient_accumulation_steps=b["grad_accum"], learning_rate=b["lr"], lr_scheduler_type="linear",
        warmup_steps=b["warmup_steps"], weight_decay=b["weight_decay"], max_grad_norm=b["max_grad_norm"],
        seed=b["seed"], lmbda=b["lmbda"], beta=b["beta"], temperature=1.0, max_new_tokens=b["max_response_tokens"],
        max_length=b["max_prompt_tokens"] + b["max_response_tokens"], bf16=False, fp16=False,
        gradient_checkpointing=False, use_cpu=True, save_strategy="no", report_to="none", logging_steps=10,
        disable_tqdm=True, dataloader_num_workers=0)


def train(job: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.gkd import GKDTrainer

    use_threads(job["threads"])
    b = job["budget"]
    rows = read_jsonl(Path(job["data"]) / "train.jsonl")
    tokenizer = AutoTokenizer.from_pretrained(job["student"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    student = AutoModelForCausalLM.from_pretrained(job["student"], dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(job["teacher"], dtype=torch.float32)
    # a sampled response ends at the chat template's end of turn or EOS, as kdistill's does (GKDTrainer stops at
    # the student's generation_config.eos_token_id)
    student.generation_config.eos_token_id = job["stop_ids"]
    counts = {"targets": 0, "batches": 0, "on_policy_batches": 0, "divided_by_loaded_rows": 0}

    class CountingGKDTrainer(GKDTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            counts["targets"] += int((inputs["labels"][:, 1:] != IGNORE).sum())
            counts["batches"] += 1
            counts["divided_by_loaded_rows"] += num_items_in_batch is not None
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        @staticmethod
        def generate_on_policy_outputs(model, inputs, generation_config):
            counts["on_policy_batches"] += 1
            return GKDTrainer.generate_on_policy_outputs(model, inputs, generation_config)

    with tempfile.TemporaryDirectory(prefix="peers-trl-") as tmp:
        trainer = CountingGKDTrainer(model=student, teacher_model=teacher, args=gkd_config(b, tmp),
                                     train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
        started = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - started
    out = Path(job["out"]) / "model"
    student.save_pretrained(out)
    tokenizer.save_pretrained(out)
    steps = trainer.state.global_step
    return {"train_wall_time_s": wall, "steps": steps, "examples": steps * b["batch_size"],
            "targets": counts["targets"], "tokens_per_s": counts["targets"] / wall,
            "batches": counts["batches"], "on_policy_batches": counts["on_policy_batches"],
            "loss_divisor": "targets of the rows loaded (num_items_in_batch)" if counts["divided_by_loaded_rows"]
            else "targets of the micro-batch",
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "versions": versions("torch", "transformers", "trl", "accelerate", "datasets")}


if __name__ == "__main__":
    main({"train": train})
