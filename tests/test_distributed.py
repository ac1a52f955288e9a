"""Two CPU processes (torchrun, gloo) train exactly what one process trains on the same global batch.

`train.batch_size` is the global batch: each process takes its half of every micro-batch, and the loss is normalised
by the global counts (times world_size against DDP's averaging), so the step's gradient is the same. Dropout is
off (every process draws its own masks); the student is narrower than the teacher, so the learned projection (kept
outside DDP, its gradients averaged by hand) is checked too, with gradient accumulation (no_sync) on.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from tests.conftest import tiny_gpt2
from tests.helpers import (
    accuracies,
    assert_same_steps,
    finish,
    history,
    save_teacher_dir,
    start_kdistill,
    write_lm_recipe,
    write_recipe,
    write_toy_csv,
)

pytestmark = pytest.mark.slow


def test_two_processes_train_what_one_process_trains(tmp_path, tiny_tokenizer):
    teacher = save_teacher_dir(tmp_path / "teacher", tiny_tokenizer, hidden_dropout_prob=0.0,
                               attention_probs_dropout_prob=0.0)
    recipe = write_recipe(tmp_path / "toy.yaml", {
        "name": "toy-ddp",
        "data": {"train_file": str(write_toy_csv(tmp_path / "toy.csv", 90)), "max_length": 16},
        "teacher": {"path": str(teacher)},
        "student": {"layers": 2, "hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32,
                    "init": "pruned"},
        "distill": {"losses": {"kd": 1.0, "ce": 0.5, "hidden_mse": 1.0}, "baseline": True},
        "train": {"epochs": 2, "batch_size": 16, "grad_accum": 2, "lr": 3e-3, "warmup_ratio": 0.0},
        "eval": {"repeats": 1, "warmup": 0},
    })
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.Popen([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "kdistill.cli", "run", recipe,
                            "--out", tmp_path / "two"], env=env, text=True, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)
    one = finish(start_kdistill("run", recipe, "--out", tmp_path / "one"))
    two = finish(two)
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    assert "world size 2 (DistributedType.MULTI_CPU)" in two.stderr
    assert two.stdout.count("run dir:") == 1  # the main process alone reports

    one_dir, two_dir = tmp_path / "one", tmp_path / "two"
    metrics = json.loads((two_dir / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["machine"]["world_size"] == 2
    for name in ("student", "baseline"):
        steps = history(two_dir, name)["steps"]
        assert len(steps) == 2 * 4  # 64 training examples, 16 a step (2 micro-batches of 8, 4 + 4 per process)
        # (rel and abs tolerances: the processes pad their shares to their own lengths and sum in another order;
        # kd is ~1e-5 here, a difference of logits that cancel, where float noise is ~1e-7)
        assert_same_steps(steps, history(one_dir, name)["steps"], rel=1e-4, abs=1e-6)
        # validation gathers each process's share once: the same loss and accuracy as one process over all of it
        assert_same_steps(history(two_dir, name)["evals"], history(one_dir, name)["evals"], rel=1e-4, abs=1e-6)
        a, b = load_file(two_dir / name / "model.safetensors"), load_file(one_dir / name / "model.safetensors")
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    assert accuracies(two_dir) == accuracies(one_dir)
    assert len(list((two_dir / "logs" / "student").glob("events.out.tfevents.*"))) == 1  # one writer: the main one


def test_two_processes_train_the_causal_lm_one_process_trains(tmp_path, bpe_tokenizer, docs):
    """A causal-LM run (top-k teacher signal: each process writes its shards, both read all of it; KD and no-KD
    phases) in 2 processes: the same steps, validation perplexities and weights as in one. Each process holds half of
    every micro-batch; the loss is normalised by the step's next-token targets over both (terms.step_loss)."""
    two = run_causal_twice(tmp_path, tiny_gpt2(bpe_tokenizer), bpe_tokenizer, docs, {})
    assert "world size 2 (DistributedType.MULTI_CPU)" in two.stderr


def test_fsdp_two_processes_train_the_causal_lm_one_process_trains(tmp_path, bpe_tokenizer, docs):
    """train.fsdp: a grouped-query-attention Llama student sharded over 2 gloo processes (FSDP2, each block and the
    root a fully_shard unit, AdamW on the shards) takes the steps and reaches the weights that one unsharded process
    does. Sharding changes where each sum is taken (a gradient reduce-scattered, a norm over the shards), not what
    is summed: the same ~1e-7 relative float32 differences as DDP, far below what a wrong normalisation would do."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(bpe_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=bpe_tokenizer.eos_token_id, eos_token_id=bpe_tokenizer.eos_token_id,
                         pad_token_id=bpe_tokenizer.eos_token_id, tie_word_embeddings=True)  # as SmolLM2's
    two = run_causal_twice(tmp_path, LlamaForCausalLM(config).eval(), bpe_tokenizer, docs, {"fsdp": True})
    assert "train.fsdp: no checkpoints" in two.stderr
    held, total = map(int, re.search(r"sharded over 2 processes: this one holds (\d+) of its (\d+) parameters",
                                     two.stderr).groups())
    assert total / 2 <= held < total / 2 + 32 * 2  # half of each parameter (a dim-0 shard rounds up a row)


def run_causal_twice(tmp_path, teacher, tokenizer, docs, train: dict):
    """The same tiny causal-LM recipe (KD student and no-KD baseline, 2-layer student from `teacher`, `train` keys
    added) run by 2 torchrun processes and by 1 plain one; asserts that both phases took the same steps and
    validations and saved the same weights, and returns the 2-process run's completed process."""
    # (no dropout in the teacher: the processes would draw their own masks)
    recipe = write_lm_recipe(
        tmp_path, teacher, tokenizer, docs, name="tiny-lm-ddp", block_size=16,
        student={"layers": 2},
        distill={"temperature": 2.0, "losses": {"forward_kl": 1.0, "lm": 0.5}, "cache_top_k": 16},
        train={"max_steps": 4, "batch_size": 8, "grad_accum": 2, "lr": 1e-3, "warmup_ratio": 0.0},
        eval={"repeats": 1, "warmup": 0, "throughput_batch_size": 2},
    )
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KDISTILL_CACHE_DIR": str(tmp_path / "cache")}
    sets = [arg for key, value in train.items() for arg in ("--set", f"train.{key}={json.dumps(value)}")]
    two = subprocess.Popen([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "kdistill.cli", "run", recipe,
                            "--out", tmp_path / "two", *sets], env=env, text=True, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)
    one = finish(start_kdistill("run", recipe, "--out", tmp_path / "one", env=env))
    two = finish(two)
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]

    one_dir, two_dir = tmp_path / "one", tmp_path / "two"
    assert json.loads((two_dir / "metrics.json").read_text(encoding="utf-8"))["machine"]["world_size"] == 2
    for name in ("student", "baseline"):
        steps = history(two_dir, name)["steps"]
        assert len(steps) == 4
        # (float32 sums over the two processes' halves in another order: ~1e-7 relative per term, far below what a
        # wrong normalisation (a factor of the per-process target counts, here 2x) would change)
        assert_same_steps(steps, history(one_dir, name)["steps"], rel=1e-4, abs=1e-6)
        assert_same_steps(history(two_dir, name)["evals"], history(one_dir, name)["evals"], rel=1e-4, abs=1e-6)
        a, b = load_file(two_dir / name / "model.safetensors"), load_file(one_dir / name / "model.safetensors")
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    return two
