"""Export a model dir as a self-contained Hugging Face dir, ONNX dir or (causal LMs) GGUF file, and prove it still
gives the same answers.

    export_model("runs/demo/student", fmt="onnx", out_dir="exports/student-onnx", quantize="int8")

Exported dir layouts (each one is a model dir that `load_predictor` and `kdistill serve` accept):

    fmt="hf"                              fmt="onnx" [quantize="int8"]
      config.json                           config.json                 (label names, model type)
      model.safetensors                     model.onnx                  (fp32; inputs input_ids, attention_mask
      tokenizer.json, tokenizer_config.json   [model.int8.onnx]          [+ token_type_ids]; output logits;
      kdistill.json                         tokenizer.json, ...           dynamic batch and sequence axes)
      parity.json                           kdistill.json
                                            parity.json

fmt="gguf" (a Llama or Qwen2 causal LM, for llama.cpp and Ollama) writes model.gguf, kdistill.json and parity.json;
kdistill/deploy/gguf.py describes the file and its parity check.

The int8 model sits next to the fp32 one in the same dir: parity needs the fp32 graph anyway, and the user can
pick either (`load_predictor(dir)` takes int8 when present; backend="onnx" forces fp32).

Parity is part of every export: the source model in PyTorch and the exported model (reloaded from the new dir,
tokenizer included) predict the same texts; parity.json records the max |Δlogit|, argmax agreement and, given
labels, each backend's accuracy. An fp32 export whose logits differ by more than `parity_atol` is an error (for
GGUF: next-token log-probs, and the tokenizer rebuilt from the file must give the same ids).

Writes are atomic: everything is built in a temp dir beside out_dir and renamed into place at the end, so a
failure leaves no out_dir (and an existing out_dir untouched).

A bad argument, model dir or out dir is a kdistill.errors.UserError naming it (the CLI: one line, exit code 2); a
failed parity check is a RuntimeError.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np

from kdistill import __version__
from kdistill.deploy import gguf
from kdistill.deploy.predict import (
    Predictor,
    _TorchRunner,
    load_predictor,
    resolve_max_length,
)
from kdistill.errors import UserError
from kdistill.io import atomic_dir, check_writable, output_errors
from kdistill.models import (
    META_FILE,
    ModelDirInfo,
    inspect_model_dir,
    load_dir_model,
    load_dir_tokenizer,
)
from kdistill.task import get_task, task_names

logger = logging.getLogger(__name__)

ONNX_OPSET = 17
PARITY_BATCH_SIZE = 16

# Used when no parity texts are given: short and long, punctuation, digits, non-ASCII, and one longer than most
# max_lengths so truncation is exercised too.
SAMPLE_TEXTS = [
    "The team scored a late goal to win the match.",
    "New phone chips make software run faster on the network.",
    "The minister called a vote on the new election law.",
    "ok",
    "What a week: 3 launches, 2 recalls and 1 surprise!",
    "Café owners in São Paulo said prices rose 12% this year.",
    "The coach praised the league, the senate passed the data law, and the robot won the robotics cup. " * 12,
    "Short news.",
]


def export_model(
    model_dir: str | os.PathLike,
    *,
    fmt: Literal["hf", "onnx", "gguf"],
    out_dir: str | os.PathLike,
    quantize: Literal["int8"] | None = None,
    parity_texts: Sequence[str] | None = None,
    parity_labels: Sequence[int] | None = None,
    overwrite: bool = False,
    opset: int = ONNX_OPSET,
    parity_atol: float | None = None,
    fuse: bool = True,
    outtype: Literal["f16", "f32"] | None = None,
) -> dict[str, Any]:
    """Export `model_dir` to `out_dir` as fmt "hf", "onnx" (optionally also int8-quantized) or "gguf"; return
    parity.json.

    parity_labels: gold label ids for parity_texts, to record accuracy of each backend.
    overwrite: replace an existing non-empty out_dir (otherwise that is an error).
    parity_atol: largest |Δlogit| accepted between PyTorch and the fp32 export (default 1e-3); for GGUF the largest
    |Δ log-prob| against the weights the file stores (default gguf.PARITY_ATOL).
    fuse: for encoder families onnxruntime knows (FUSABLE_MODEL_TYPES), fuse attention, LayerNorm and GELU into
    its contrib ops (see _fuse_onnx); the graph then runs on onnxruntime only. Off: a plain ONNX graph.
    outtype: GGUF only, the weights' type: "f32" (default) or "f16".
    """
    if opset < 17:
        raise UserError(f"ONNX opset must be >= 17, got {opset}")
    info, out = check_export(model_dir, fmt=fmt, out_dir=out_dir, quantize=quantize, overwrite=overwrite,
                             outtype=outtype)
    outtype = outtype or (gguf.DEFAULT_OUTTYPE if fmt == "gguf" else None)
    atol = parity_atol if parity_atol is not None else gguf.PARITY_ATOL if fmt == "gguf" else 1e-3
    task = get_task(info.task)
    texts, labels = _parity_inputs(parity_texts, parity_labels, len(info.labels))

    tokenizer = load_dir_tokenizer(info.path)
    max_length = resolve_max_length(info, tokenizer)
    model = load_dir_model(info.path, info.task)
    num_parameters = sum(p.numel() for p in model.parameters())
    meta = {
        **info.meta,
        "task": info.task,
        "max_length": max_length,
        "num_parameters": num_parameters,
        "export": {"format": fmt, "quantize": quantize, "source": str(info.path), "kdistill_version": __version__},
    }

    with output_errors(out), atomic_dir(out) as tmp:  # disk full, read-only: one line naming out, nothing left
        if fmt == "gguf":  # the file holds the tokenizer and the config
            meta["export"].update(gguf.write_gguf(model, tokenizer, info.path, tmp / gguf.GGUF_FILE, outtype=outtype))
        else:
            tokenizer.save_pretrained(str(tmp))
        if fmt == "hf":
            model.save_pretrained(str(tmp))
            unsafe = sorted(p.name for p in tmp.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl"))
            if unsafe:  # save_pretrained writes safetensors in transformers 5; guard against a change
                raise RuntimeError(f"export wrote pickle-based files {unsafe}; only safetensors are allowed")
        elif fmt == "onnx":
            model.config.save_pretrained(str(tmp))
            meta["export"].update(_write_onnx(model, tokenizer, tmp, opset, max_length, fuse=fuse, quantize=quantize))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")

        if task.export_files is not None:  # e.g. a sentence encoder's module files: the pooling it applies
            task.export_files(tmp, info, model, max_length)
        if fmt == "gguf":  # raises itself past atol, and when the file's tokenizer gives other ids
            parity = gguf.gguf_parity(model, tokenizer, tmp, texts, max_length, outtype=outtype, atol=atol)
        elif task.predictor is not None:  # its predictor's logits (a row per token for a token classifier)
            parity = _predictor_parity(task, model, tokenizer, info, max_length, tmp, fmt, quantize, texts, labels)
        else:
            parity = _lm_parity(model, tokenizer, info.task, tmp, texts, max_length)
        parity.update(format=fmt, quantize=quantize, source=str(info.path), n_texts=len(texts),
                      texts="given" if parity_texts is not None else "built-in samples", max_length=max_length,
                      atol=atol, versions=_versions(fmt))
        worst = parity["backends"].get("onnx" if fmt == "onnx" else "hf", {}).get("max_abs_logit_diff", 0.0)
        if worst > atol:
            raise RuntimeError(f"parity check failed: exported logits differ from PyTorch by up to {worst:.3g} "
                               f"(> atol {atol:g}); nothing was written")
        (tmp / "parity.json").write_text(json.dumps(parity, indent=2) + "\n", encoding="utf-8")
    parity["out_dir"] = str(out)
    logger.info("exported %s to %s", info.path, out)
    return parity


def check_export(model_dir: str | os.PathLike, *, fmt: str, out_dir: str | os.PathLike, quantize: str | None = None,
                 overwrite: bool = False, outtype: str | None = None) -> tuple[ModelDirInfo, Path]:
    """(the model dir's info, the out dir) once the arguments, the model dir and the out dir are checked, before any
    work: the out dir is new or empty (or `overwrite`), can be written, and its file system has the space
    `export_bytes` says the export takes."""
    if fmt not in ("hf", "onnx", "gguf"):
        raise UserError(f"unknown export format {fmt!r}; choose hf, onnx or gguf")
    if quantize not in (None, "int8"):
        raise UserError(f"unknown quantization {quantize!r}; choose int8 or none")
    if quantize and fmt != "onnx":
        raise UserError("quantize='int8' needs fmt='onnx' (int8 is onnxruntime dynamic quantization)")
    if outtype is not None and fmt != "gguf":
        raise UserError(f"outtype={outtype!r} is for fmt='gguf' (the GGUF weights' type)")
    info = inspect_model_dir(model_dir)
    task = get_task(info.task)
    if fmt == "gguf":
        gguf.check_gguf_source(info, outtype or gguf.DEFAULT_OUTTYPE)
    if fmt == "onnx" and task.predictor is None:
        able = ", ".join(n for n in task_names() if get_task(n).predictor is not None)
        raise UserError(f"{info.path}: ONNX export supports {able} model dirs only (task={info.task!r})")
    out = _check_out_dir(Path(out_dir), info.path, overwrite)
    check_writable(out, export_bytes(info.path, quantize))
    return info, out


def export_bytes(model_dir: Path, quantize: str | None = None) -> int:
    """About what an export of `model_dir` takes: its files (weights, tokenizer, config; the fp32 ONNX graph is
    about the size of fp32 weights), plus a quarter of the weights for an int8 copy beside it. An existing out dir
    is replaced only once the new one is complete, so its size is not counted as free."""
    files = [f for f in Path(model_dir).rglob("*") if f.is_file()]
    weights = sum(f.stat().st_size for f in files if f.suffix in (".safetensors", ".onnx"))
    return sum(f.stat().st_size for f in files) + (weights // 4 if quantize == "int8" else 0)


def _check_out_dir(out: Path, model_dir: Path, overwrite: bool) -> Path:
    """`out` where an export may go: not the model dir, a folder, empty unless `overwrite`."""
    if out.resolve() == model_dir.resolve():
        raise UserError(f"out dir {out} is the model dir itself; choose another out dir")
    if out.exists() and not out.is_dir():
        raise UserError(f"out dir {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"out dir {out} exists and is not empty; remove it or choose another --out")
    return out


def _parity_inputs(parity_texts, parity_labels, n_classes: int) -> tuple[list[str], list[int] | None]:
    """The texts (default: SAMPLE_TEXTS) and gold class ids (or None) the parity check reads, checked."""
    texts = list(parity_texts) if parity_texts is not None else list(SAMPLE_TEXTS)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise UserError("parity_texts must be a non-empty list of strings")
    if parity_labels is None:
        return texts, None
    labels = list(parity_labels)
    if len(labels) != len(texts):
        raise UserError(f"parity_labels has {len(labels)} labels for {len(texts)} parity texts")
    bad = [y for y in labels if not isinstance(y, (int, np.integer)) or not 0 <= int(y) < n_classes]
    if bad:
        raise UserError(f"parity_labels must be class ids 0..{n_classes - 1}; got {bad[:3]}")
    return texts, [int(y) for y in labels]


# --------------------------------------------------------------------------------------------- ONNX

def _write_onnx(model, tokenizer, tmp: Path, opset: int, max_length: int, *, fuse: bool, quantize) -> dict:
    """model.onnx (fused where onnxruntime knows the family) and model.int8.onnx (`quantize`) in `tmp`; returns
    what the export's metadata records of them."""
    extra: dict[str, Any] = {"opset": opset}
    fusable = fuse and model.config.model_type in FUSABLE_MODEL_TYPES
    if fusable:
        from kdistill.features import ensure_eager_attention

        ensure_eager_attention(model)  # the fusion matches the eager attention subgraph, not SDPA's
    extra["onnx_inputs"] = _export_onnx(model, tokenizer, tmp / "model.onnx", opset, max_length)
    if fusable:
        extra["fused_ops"] = _fuse_onnx(tmp / "model.onnx", model.config)
    if quantize:
        extra["int8"] = _quantize_int8(tmp / "model.onnx", tmp / "model.int8.onnx")
    return extra



# model_type values whose graphs onnxruntime's BERT optimizer fuses (same encoder block layout)
FUSABLE_MODEL_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "electra"})


def _export_onnx(model, tokenizer, path: Path, opset: int, max_length: int) -> list[str]:
    """torch.onnx.export (TorchScript-based exporter) with dynamic batch and sequence axes.

    The dynamo exporter (torch's default) needs onnxscript, which is not a dependency; the TorchScript
    exporter handles Hugging Face encoders well. The sample batch has padding so the attention mask path
    is traced (transformers may skip the mask for an all-ones batch).
    """
    import inspect

    import torch

    accepts = set(inspect.signature(model.forward).parameters)
    names = ["input_ids", "attention_mask"]
    if "token_type_ids" in accepts and "token_type_ids" in getattr(tokenizer, "model_input_names", []):
        names.append("token_type_ids")
    length = max(4, min(16, max_length))
    enc = tokenizer(
        ["hello", "hello world, this is a longer example"],
        padding="max_length",
        truncation=True,
        max_length=length,
        return_tensors="pt",
    )
    args = tuple(enc[n] if n in enc else torch.zeros_like(enc["input_ids"]) for n in names)

    class Logits(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *tensors):
            out = self.inner(**dict(zip(names, tensors)))
            return out.logits if "logits" in out else out.last_hidden_state  # a sentence encoder: (B, L, D)

    dynamic_axes = {n: {0: "batch", 1: "sequence"} for n in names}
    dynamic_axes["logits"] = {0: "batch"}
    with torch.no_grad():
        if Logits(model).eval()(*args).dim() == 3:  # a token classifier: (batch, sequence, tags)
            dynamic_axes["logits"] = {0: "batch", 1: "sequence"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation chatter; parity below is the real check
        torch.onnx.export(
            Logits(model).eval(),
            args,
            str(path),
            input_names=names,
            output_names=["logits"],
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    import onnx

    onnx.checker.check_model(str(path))
    return names


def _fuse_onnx(path: Path, config) -> dict[str, int]:
    """Rewrite `path` in place with onnxruntime's transformer optimizer; return the fused-op counts (> 0 only).

    It replaces each layer's ~40 primitive ops (Q/K/V MatMuls, softmax, LayerNorm, GELU pieces) by a few contrib
    ops (Attention, SkipLayerNormalization, BiasGelu, EmbedLayerNormalization). Measured on the 2-layer x 128
    student, batch 1, 128 tokens, 2 threads: int8 1.40 -> 1.14 ms; 2 x 384: int8 4.16 -> 3.56 ms; fp32 logits
    unchanged (max |Δ| 1e-6). The parity check afterwards guards the rewrite.
    """
    from onnxruntime.transformers.optimizer import optimize_model

    with _onnxruntime_tools_quiet():
        optimized = optimize_model(
            str(path), model_type="bert", num_heads=config.num_attention_heads, hidden_size=config.hidden_size
        )
        optimized.save_model_to_file(str(path))
        fused = optimized.get_fused_operator_statistics()
    return {op: n for op, n in fused.items() if n}


def _quantize_int8(src: Path, dst: Path) -> dict:
    """onnxruntime dynamic quantization: int8 weights of MatMul/Gemm, activations quantized at run time.

    Settings chosen by measurement (all-MiniLM-L6-v2 encoder with an 8-class head, 300 texts, int8 vs fp32
    ONNX): per_channel=True halves the mean |Δlogit| (0.045 vs 0.079 per-tensor) and agrees more on argmax;
    reduce_range=True (7-bit weights, meant for CPUs without VNNI) only adds error (0.048 / 0.118).
    onnxruntime's quant_pre_process changed nothing for this graph, so it is not run.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    import onnx

    # Attention: the fused op (see _fuse_onnx) holds the Q/K/V weights; quantizing it gives QAttention.
    settings = {"weight_type": "QInt8", "op_types": ["MatMul", "Gemm", "Attention"], "per_channel": True,
                "reduce_range": False}
    with _onnxruntime_tools_quiet():  # the quantizer logs one INFO line per node
        quantize_dynamic(
            src,
            dst,
            op_types_to_quantize=settings["op_types"],
            weight_type=QuantType.QInt8,
            per_channel=settings["per_channel"],
            reduce_range=settings["reduce_range"],
            # contrib ops defeat ONNX shape inference; their outputs are float32
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    return settings


@contextmanager
def _onnxruntime_tools_quiet():
    """onnxruntime's optimizer and quantizer log INFO lines through the root logger's level, and warn; mute both."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


# --------------------------------------------------------------------------------------------- parity


def _compare(reference: np.ndarray, candidate: np.ndarray) -> dict:
    return {
        "max_abs_logit_diff": float(np.abs(reference - candidate).max()) if reference.size else 0.0,
        "argmax_agreement": float((reference.argmax(-1) == candidate.argmax(-1)).mean()) if len(reference) else 1.0,
    }


def _accuracy(logits: np.ndarray, labels: list[int] | None) -> float | None:
    return None if labels is None else float((logits.argmax(-1) == np.asarray(labels)).mean())


def _predictor_parity(task, model, tokenizer, info, max_length, tmp, fmt, quantize, texts, labels) -> dict:
    """The task's predictor over PyTorch against the same over each exported backend (a sentence encoder's
    pooled embeddings (N, D) are compared as logits are)."""
    reference = task.predictor(info, tokenizer, _TorchRunner(model), max_length)
    ref_logits, n_truncated = reference.predict_logits(texts, batch_size=PARITY_BATCH_SIZE)
    backends: dict[str, dict] = {"pytorch": {"accuracy": _accuracy(ref_logits, labels)}}
    names = ["hf"] if fmt == "hf" else ["onnx"] + (["onnx-int8"] if quantize else [])
    for name in names:
        candidate = load_predictor(tmp, backend="torch" if name == "hf" else name)
        logits, _ = candidate.predict_logits(texts, batch_size=PARITY_BATCH_SIZE)
        entry = {"file": _weights_file(candidate), **_compare(ref_logits, logits)}
        entry["accuracy"] = _accuracy(logits, labels)
        entry["size_bytes"] = _size(tmp / entry["file"]) if entry["file"] else None
        backends[name] = entry
    return {"reference": "pytorch", "n_truncated": n_truncated, "batch_size": PARITY_BATCH_SIZE, "backends": backends}


def _lm_parity(model, tokenizer, task: str, tmp: Path, texts: list[str], max_length: int) -> dict:
    """hf export of a causal LM: reload it and compare next-token logits text by text (no pad token needed)."""
    import torch

    reloaded = load_dir_model(tmp, task)
    worst, agree, total = 0.0, 0, 0
    with torch.inference_mode():
        for text in texts:
            ids = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt",
                            split_special_tokens=True)["input_ids"]  # user text: "[SEP]" in it is text
            a, b = model(input_ids=ids).logits, reloaded(input_ids=ids).logits
            worst = max(worst, float((a - b).abs().max()))
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            total += a.shape[1]
    entry = {"file": "model.safetensors", "max_abs_logit_diff": worst, "argmax_agreement": agree / max(total, 1)}
    return {"reference": "pytorch", "backends": {"pytorch": {}, "hf": entry}}


def _weights_file(predictor: Predictor) -> str | None:
    path = getattr(predictor._runner, "path", None)
    return path.name if path is not None else "model.safetensors"


def _size(path: Path) -> int | None:
    return path.stat().st_size if path.is_file() else None


def _versions(fmt: str) -> dict:
    import torch
    import transformers

    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    if fmt == "gguf":
        return {**versions, "gguf": gguf.gguf_version()}
    import onnxruntime

    return {**versions, "onnxruntime": onnxruntime.__version__}
