"""Does bf16 autocast or torch.compile speed up a distillation step here? Seconds per step, side by side.

    python benchmarks/precision_compile.py --teacher runs/default/teacher
    python benchmarks/precision_compile.py --teacher runs/default/teacher --steps 20 --batch-size 16 --length 128

One distillation step as kdistill's explicit loop takes it with the logits cached: student forward on a batch of
real token ids, KD (T=4) + CE, backward, fused AdamW step. The student is the default recipe's (2 layers copied
from the teacher). Variants, each on its own copy of the same initial student:
  fp32          plain float32 (kdistill's default, `train.mixed_precision: "no"`)
  bf16          torch.autocast(cpu, bfloat16) around forward and loss (what `train.mixed_precision: bf16` does
                through accelerate), fp32 master weights
  compile       torch.compile(student) (inductor), fp32; its compile time is reported apart, not in the steps
Variants take turns, a block of steps each, so machine drift hits all alike; the per-step medians after warm-up
and the ratios to fp32 are what to compare. Also reported: the CPU's bf16/AMX flags, since bf16 speed depends on
them. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's kdistill, installed or not


def cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return sorted(f for f in flags if f.startswith(("amx", "avx512_bf16", "avx512f")))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True, help="a trained classifier dir (the student copies its layers)")
    parser.add_argument("--steps", type=int, default=20, help="measured steps per variant")
    parser.add_argument("--block", type=int, default=5, help="consecutive steps per variant and turn")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured steps per variant first")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--length", type=int, default=128, help="tokens per example")
    parser.add_argument("--variants", nargs="+", default=["fp32", "bf16", "compile"],
                        choices=["fp32", "bf16", "compile"])
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's default)")
    args = parser.parse_args(argv)

    import torch

    from kdistill import losses
    from kdistill.models import load_model_dir
    from kdistill.student import build_student
    from kdistill.training import make_optimizer

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    teacher, tokenizer, _ = load_model_dir(args.teacher)
    base = build_student(teacher, num_layers=2).train()
    vocab, n_classes = teacher.config.vocab_size, teacher.config.num_labels
    input_ids = torch.randint(1000, vocab, (args.batch_size, args.length))  # (B, T)
    mask = torch.ones_like(input_ids)
    labels = torch.randint(0, n_classes, (args.batch_size,))
    with torch.no_grad():
        teacher_logits = teacher.eval()(input_ids=input_ids, attention_mask=mask).logits  # (B, C), the cache

    variants = {}
    compile_s = None
    for name in args.variants:
        student = copy.deepcopy(base)
        forward = student
        if name == "compile":
            forward = torch.compile(student)
        optimizer, _ = make_optimizer(student.named_parameters(), lr=1e-4, weight_decay=0.01, total_steps=10**6,
                                      warmup_ratio=0.0)
        variants[name] = (student, forward, optimizer)

    def step(name: str) -> float:
        _, forward, optimizer = variants[name]
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name == "bf16"):
            student_logits = forward(input_ids=input_ids, attention_mask=mask).logits  # (B, C)
            kd_sum, n = losses.soft_kl(student_logits.float(), teacher_logits, temperature=4.0)
            ce_sum, _ = losses.hard_ce(student_logits.float(), labels)
        loss = (kd_sum + 0.1 * ce_sum) / n
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return time.perf_counter() - t0

    for name in variants:
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            step(name)
        if name == "compile":
            compile_s = time.perf_counter() - t0
    times: dict[str, list[float]] = {name: [] for name in variants}
    while min(len(v) for v in times.values()) < args.steps:
        for name in variants:
            times[name].extend(step(name) for _ in range(args.block))
    fp32 = statistics.median(times["fp32"]) if "fp32" in times else None
    result = {
        "benchmark": "precision_compile",
        "batch_size": args.batch_size,
        "length": args.length,
        "threads": torch.get_num_threads(),
        "variants": {name: {"median_step_s": round(statistics.median(v), 4),
                            "speedup_vs_fp32": round(fp32 / statistics.median(v), 2) if fp32 else None}
                     for name, v in times.items()},
        "compile_and_warmup_s": round(compile_s, 1) if compile_s is not None else None,
        "cpu_flags": cpu_flags(),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
