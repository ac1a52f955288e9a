"""Batch-1 CPU latency, side by side in one process: teacher PyTorch, student PyTorch / ONNX fp32 / ONNX int8.

    python benchmarks/latency_backends.py --teacher runs/demo/teacher --student runs/demo/student

The student is exported to ONNX (fp32 and int8) in a temp dir first. Each measurement is one
`Predictor.predict([text])` call (tokenize + forward + softmax: what a caller waits for), and separately the
model call alone on the already tokenized input (`model_ms`: tokenizing a long article costs ~1 ms whatever the
model). Backends take turns, a block of calls each (after one warm call, so each runs with its own weights in
cache, as a server would), so drift on a noisy machine hits all of them alike; the medians and the ratios to
the teacher are what to compare. onnxruntime's thread spinning is off: its idle
threads would otherwise busy-wait on the cores while the PyTorch models run (measured: teacher 28 -> 49 ms).
Prints one JSON line.

Inputs: --texts-file (one text per line) or --data (JSONL with a "text" field); by default a few built-in
English sentences repeated to about 128 tokens (then truncated to each model's max_length).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's kdistill, installed or not

SENTENCES = [
    "The team scored a late goal to win the match after a long and difficult season.",
    "New phone chips make software run faster while using less power on the network.",
    "The minister called a vote on the new election law, and the senate will debate it.",
    "Researchers say the robot learned to sort parcels by watching people do it.",
]


def default_text(tokenizer, target_tokens: int = 128) -> str:
    words: list[str] = []
    i = 0
    while len(tokenizer(" ".join(words))["input_ids"]) < target_tokens:
        words.extend(SENTENCES[i % len(SENTENCES)].split())
        i += 1
    while len(words) > 1 and len(tokenizer(" ".join(words[:-1]))["input_ids"]) >= target_tokens:
        words.pop()  # trim to about target_tokens
    return " ".join(words)


def load_texts(args, tokenizer) -> list[str]:
    if args.texts_file:
        path = Path(args.texts_file)
        if not path.is_file():
            raise SystemExit(f"latency_backends: texts file not found: {path}")
        texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif args.data:
        from kdistill.deploy.predict import read_jsonl_texts

        _, texts = read_jsonl_texts(args.data)
    else:
        texts = [default_text(tokenizer)]
    if not texts:
        raise SystemExit("latency_backends: no texts to measure")
    return texts[: args.max_texts]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True, help="teacher model dir (safetensors)")
    parser.add_argument("--student", required=True, help="student model dir (safetensors)")
    parser.add_argument("--data", help="JSONL file with a 'text' field")
    parser.add_argument("--texts-file", help="one text per line")
    parser.add_argument("--max-texts", type=int, default=32, help="use at most this many texts, in turn")
    parser.add_argument("--runs", type=int, default=50, help="measured calls per backend")
    parser.add_argument("--warmup", type=int, default=5, help="unmeasured calls per backend first")
    parser.add_argument("--block", type=int, default=10, help="consecutive measured calls per backend and turn")
    parser.add_argument("--threads", type=int, default=None, help="compute threads (default: torch's default)")
    args = parser.parse_args(argv)

    import torch

    from kdistill.deploy.export import export_model
    from kdistill.deploy.predict import load_predictor

    import transformers

    logging.getLogger("kdistill.deploy.predict").setLevel(logging.ERROR)  # truncation is expected here
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)

    with tempfile.TemporaryDirectory(prefix="kdistill-latency-") as tmp:
        student_torch = load_predictor(args.student, backend="torch")
        texts = load_texts(args, student_torch.tokenizer)
        onnx_dir = Path(tmp) / "student-onnx"
        parity = export_model(args.student, fmt="onnx", out_dir=onnx_dir, quantize="int8", parity_texts=texts)
        predictors = {
            "teacher_torch_fp32": load_predictor(args.teacher, backend="torch"),
            "student_torch_fp32": student_torch,
            "student_onnx_fp32": load_predictor(onnx_dir, backend="onnx", num_threads=threads, ort_spinning=False),
            "student_onnx_int8": load_predictor(
                onnx_dir, backend="onnx-int8", num_threads=threads, ort_spinning=False
            ),
        }
        times: dict[str, list[float]] = {name: [] for name in predictors}
        model_times: dict[str, list[float]] = {name: [] for name in predictors}
        for name, predictor in predictors.items():
            for text in texts[: args.warmup]:
                predictor.predict([text])
        n_rounds = -(-args.runs // args.block)
        for round_ in range(n_rounds):
            for name, predictor in predictors.items():
                # One warm call, then a block of measured ones: what a server running only this model sees
                # (its weights in cache), while the rotation keeps machine drift fair to every backend.
                predictor.predict([texts[round_ % len(texts)]])
                for i in range(args.block):
                    text = texts[(round_ * args.block + i) % len(texts)]
                    t0 = time.perf_counter()
                    predictor.predict([text])
                    t1 = time.perf_counter()
                    predictor.run_model(predictor.encode([text])[0])
                    t2 = time.perf_counter()
                    times[name].append((t1 - t0) * 1000)
                    model_times[name].append((t2 - t1) * 1000)

        tokens = {
            name: statistics.median(
                min(len(p.tokenizer(t)["input_ids"]), p.max_length) for t in texts
            )
            for name, p in predictors.items()
        }
        teacher_ms = statistics.median(times["teacher_torch_fp32"])
        teacher_model_ms = statistics.median(model_times["teacher_torch_fp32"])
        backends = {}
        for name, values in times.items():
            med = statistics.median(values)
            model_med = statistics.median(model_times[name])
            backends[name] = {
                "median_ms": round(med, 3),
                "p90_ms": round(sorted(values)[int(0.9 * (len(values) - 1))], 3),
                "speedup_vs_teacher": round(teacher_ms / med, 2),
                "model_ms": round(model_med, 3),
                "model_speedup_vs_teacher": round(teacher_model_ms / model_med, 2),
                "input_tokens": tokens[name],
                "num_parameters": predictors[name].metadata["num_parameters"],
            }
        result = {
            "benchmark": "latency_backends",
            "batch_size": 1,
            "threads": threads,
            "runs": args.runs,
            "warmup": args.warmup,
            "n_texts": len(texts),
            "backends": backends,
            "int8_argmax_agreement_vs_torch": parity["backends"]["onnx-int8"]["argmax_agreement"],
            "onnx_sizes_bytes": {k: parity["backends"][k]["size_bytes"] for k in ("onnx", "onnx-int8")},
            "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine()},
            "versions": parity["versions"],
        }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
