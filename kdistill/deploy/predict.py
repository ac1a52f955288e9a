"""Predict with an exported or trained classification model dir, on PyTorch or onnxruntime.

A model dir is a Hugging Face directory: `config.json` (with id2label), tokenizer files, and weights as
`model.safetensors` (PyTorch) and/or `model.onnx` / `model.int8.onnx` (onnxruntime); optionally `kdistill.json`
with {"task": "classification", "max_length": int, ...}. A dir whose PyTorch weights are only a pickle
(`pytorch_model.bin`) is refused (kdistill.models.require_safetensors).

    predictor = load_predictor("runs/demo/student")           # backend picked from the files present
    predictor.predict(["the team won the match"])
    # [{"label": 0, "label_name": "sport", "probabilities": {"sport": 0.91, "tech": 0.05, "politics": 0.04}}]

Backend choice with backend="auto": `model.int8.onnx` (quantization was asked for when exporting), then
`model.onnx`, then safetensors weights. Loading never unpickles: safetensors only, no remote code.

Errors a user can act on (missing dir or files, a bad JSONL line, pickle-only weights, a text that is not valid
Unicode) raise kdistill.errors.UserError with one line naming the path; the CLI prints it and exits with code 2.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from kdistill.errors import LINE_BREAK, UserError, decode_utf8, encode_utf8
from kdistill.io import atomic_write_text, check_writable, output_errors
from kdistill.task import get_task, task_names
from kdistill.models import (
    META_FILE,
    ModelDirInfo,
    inspect_model_dir,
    load_dir_model,
    load_dir_tokenizer,
    require_safetensors,
)

logger = logging.getLogger(__name__)

Backend = Literal["auto", "torch", "onnx", "onnx-int8"]
ONNX_FILES = {"onnx": "model.onnx", "onnx-int8": "model.int8.onnx"}
DEFAULT_MAX_LENGTH_CAP = 512
PREFIX_CHARS_PER_TOKEN = 8
"""A long input is first tokenized as its first max_length x this many characters (cut at whitespace); see
Predictor.encode. English WordPiece averages 4-5 characters per token, so the cut nearly always lies past the
max_length-th token."""


# --------------------------------------------------------------------------------------------- model dir
# The dir's JSON files are read by kdistill.models.inspect_model_dir, its weights and tokenizer loaded by
# models.load_dir_model / load_dir_tokenizer: one reader for training, evaluation and deployment.


def onnx_files(path: Path) -> dict[str, Path]:
    """The ONNX graphs a model dir holds: backend name -> file."""
    return {name: path / f for name, f in ONNX_FILES.items() if (path / f).is_file()}


def resolve_max_length(info: ModelDirInfo, tokenizer) -> int:
    """kdistill.json's max_length if set, else min(tokenizer.model_max_length, 512).

    Also capped by the model's max_position_embeddings, so a tokenizer saved without a limit (its
    model_max_length is then a huge sentinel) cannot push positions past what the model has.
    """
    if info.meta.get("max_length") is not None:
        value = info.meta["max_length"]
        if not isinstance(value, int) or isinstance(value, bool) or value < 2:
            raise UserError(f"{info.path / META_FILE}: max_length must be an integer >= 2, got {value!r}")
        return value
    length = min(int(getattr(tokenizer, "model_max_length", DEFAULT_MAX_LENGTH_CAP)), DEFAULT_MAX_LENGTH_CAP)
    positions = info.config.get("max_position_embeddings")
    if isinstance(positions, int) and positions > 0:
        length = min(length, positions)
    return length


# --------------------------------------------------------------------------------------------- runners
# A runner maps one tokenized batch {name: int64 array (B, L)} to logits (B, C) as float32 numpy.


class _TorchRunner:
    backend = "torch"

    def __init__(self, model):
        import torch

        self.model = model
        self.torch = torch
        self.accepts = set(inspect.signature(model.forward).parameters)
        self.num_parameters = sum(p.numel() for p in model.parameters())

    def __call__(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        inputs = {k: self.torch.from_numpy(v) for k, v in batch.items() if k in self.accepts}
        with self.torch.inference_mode():
            out = self.model(**inputs)
            # a bare encoder (task embedding) has no logits: its last hidden state (B, L, D), pooled by the predictor
            return (out.logits if "logits" in out else out.last_hidden_state).float().numpy()


class _OrtRunner:
    def __init__(self, onnx_path: Path, backend: str, num_threads: int | None = None, spinning: bool = True):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if num_threads:
            options.intra_op_num_threads = num_threads
            options.inter_op_num_threads = 1
        if not spinning:
            # Idle onnxruntime threads busy-wait for the next run; that steals the cores from any other
            # compute in the process (measured: a PyTorch teacher ran 28 -> 49 ms when interleaved).
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.backend = backend
        self.path = onnx_path
        try:
            self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for corrupt files
            raise UserError(f"{onnx_path}: cannot load ONNX model ({str(e).splitlines()[0]})") from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_name = self.session.get_outputs()[0].name

    def __call__(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        feed = {}
        for name in self.input_names:
            if name in batch:
                feed[name] = batch[name].astype(np.int64, copy=False)
            elif name == "token_type_ids":
                feed[name] = np.zeros_like(batch["input_ids"], dtype=np.int64)
            else:
                raise UserError(f"{self.path}: graph input {name!r} is not produced by the tokenizer")
        return self.session.run([self.output_name], feed)[0].astype(np.float32, copy=False)


# --------------------------------------------------------------------------------------------- predictor


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


class Predictor:
    """Tokenizer + one backend + label names. Not thread-safe: call from one thread at a time."""

    def __init__(self, *, tokenizer, runner, labels: list[str], max_length: int, info: ModelDirInfo):
        self.tokenizer = tokenizer
        self._runner = runner
        self.labels = labels
        self.max_length = max_length
        self.info = info

    @property
    def backend(self) -> str:
        return self._runner.backend

    @property
    def metadata(self) -> dict[str, Any]:
        """Model name, labels, backend, max_length and num_parameters (None where unknown)."""
        num_parameters = getattr(self._runner, "num_parameters", None) or self.info.meta.get("num_parameters")
        archs = self.info.config.get("architectures") or []
        return {
            "model": self.info.meta.get("name") or self.info.path.resolve().name,
            "model_type": self.info.config.get("model_type"),
            "architecture": archs[0] if archs else None,
            "task": self.info.task,
            "labels": list(self.labels),
            "backend": self.backend,
            "max_length": self.max_length,
            "num_parameters": int(num_parameters) if num_parameters is not None else None,
        }

    def encode(self, texts: Sequence[str]) -> tuple[dict[str, np.ndarray], int]:
        """Tokenize one batch, truncated to max_length and padded; also returns how many were truncated.

        A long article would be tokenized whole only to keep its first max_length tokens (about 1 ms for 1,800
        characters, a third of a small student's latency). So a fast tokenizer first gets each long text cut at
        the last whitespace before max_length x PREFIX_CHARS_PER_TOKEN characters. Pre-tokenizers split at
        whitespace, so the words before the cut tokenize as in the whole text; when the prefix still overflows
        max_length, its truncated tokens are those of the whole text. Texts whose prefix does not overflow are
        tokenized whole again.
        """
        texts = list(texts)
        if not getattr(self.tokenizer, "is_fast", False):  # slow: whole texts, lengths counted before truncation
            enc = self._tokenize(texts)
            full = self.tokenizer(texts, truncation=False, split_special_tokens=True)["input_ids"]
            return {k: np.asarray(v) for k, v in enc.items()}, sum(1 for ids in full if len(ids) > self.max_length)
        budget = self.max_length * PREFIX_CHARS_PER_TOKEN
        prefixes = [_cut_at_whitespace(t, budget) for t in texts]
        enc = self._tokenize(prefixes)
        if any(p is not t and not e.overflowing for p, t, e in zip(prefixes, texts, enc.encodings)):
            enc = self._tokenize(texts)  # a cut text fit after all: its tokens may go on past the cut
        return {k: np.asarray(v) for k, v in enc.items()}, sum(1 for e in enc.encodings if e.overflowing)

    def _tokenize(self, texts: list[str]):
        # A request's text is text: "[SEP]" or "<s>" in it are characters, never the special tokens (as in training)
        return self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="np",
                              split_special_tokens=True)

    def run_model(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """Logits (B, C) for one batch from encode(): the backend alone, without tokenization."""
        return self._runner(batch)

    @property
    def output_width(self) -> int:
        """The width of one text's output row: the number of classes."""
        return len(self.labels)

    def predict_logits(self, texts: Sequence[str], batch_size: int = 32) -> tuple[np.ndarray, int]:
        """Logits (N, C) in input order, and the number of inputs that were truncated. No warning."""
        texts = _check_texts(texts)
        if batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}")
        n_labels = self.output_width
        if not texts:
            return np.zeros((0, n_labels), dtype=np.float32), 0
        # Batch texts of similar length together so little compute goes to padding; restore order after.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        logits = np.zeros((len(texts), n_labels), dtype=np.float32)
        n_truncated = 0
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch, truncated = self.encode([texts[i] for i in idx])
            n_truncated += truncated
            logits[idx] = self.run_model(batch)
        return logits, n_truncated

    def predict(self, texts: Sequence[str], batch_size: int = 32) -> list[dict]:
        """One {"label", "label_name", "probabilities"} per text, in input order.

        Inputs longer than max_length tokens are truncated, with one warning per call saying how many.
        """
        results, n_truncated = self.predict_counted(texts, batch_size=batch_size)
        if n_truncated:
            logger.warning(
                "%d of %d input(s) were longer than max_length=%d tokens and were truncated",
                n_truncated,
                len(results),
                self.max_length,
            )
        return results

    def predict_counted(self, texts: Sequence[str], batch_size: int = 32) -> tuple[list[dict], int]:
        """predict() without the warning: the results and how many inputs were truncated (for servers)."""
        logits, n_truncated = self.predict_logits(texts, batch_size=batch_size)
        out = []
        for row in softmax(logits):
            label = int(row.argmax())
            out.append(
                {
                    "label": label,
                    "label_name": self.labels[label],
                    "probabilities": {name: float(p) for name, p in zip(self.labels, row)},
                }
            )
        return out, n_truncated


def _cut_at_whitespace(text: str, budget: int) -> str:
    """`text` itself when it has at most `budget` characters (or no whitespace before them), else the part before
    its last whitespace within the budget."""
    if len(text) <= budget:
        return text
    cut = max(text.rfind(c, 0, budget) for c in " \n\t\r")
    return text[:cut] if cut > 0 else text


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings, not one string")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] must be a string, got {type(t).__name__}")
        if not t.strip():  # as the data readers and the server: nothing to classify is an input error
            raise UserError(f"texts[{i}] is empty")
        encode_utf8(t, f"texts[{i}]")
    return texts


def _pick_backend(info: ModelDirInfo, onnx: dict[str, Path], backend: str) -> str:
    if backend == "auto":
        for name in ("onnx-int8", "onnx"):
            if name in onnx:
                return name
        backend = "torch"
    if backend == "torch":
        require_safetensors(info.path, also_accepted="model.onnx or model.int8.onnx")  # before the tokenizer loads
        return backend
    if backend in ONNX_FILES:
        if backend not in onnx:
            raise UserError(f"{info.path}: backend {backend!r} needs {ONNX_FILES[backend]}")
        return backend
    raise UserError(f"unknown backend {backend!r}; choose auto, torch, onnx or onnx-int8")


def load_predictor(
    model_dir: str | os.PathLike,
    *,
    backend: Backend = "auto",
    num_threads: int | None = None,
    ort_spinning: bool = True,
) -> Predictor:
    """Load a classification model dir for prediction.

    backend: "auto" (model.int8.onnx, then model.onnx, then safetensors), "torch", "onnx" or "onnx-int8".
    num_threads: intra-op threads for onnxruntime, or torch.set_num_threads (process-wide) for PyTorch;
    None leaves each library's default.
    ort_spinning: let onnxruntime's idle threads busy-wait (lowest latency when it has the cores to itself);
    turn it off when other compute shares the process, e.g. a side-by-side benchmark.
    """
    info = inspect_model_dir(model_dir)
    task = predictable_task(info)
    if not info.labels and task.needs_labels:
        raise UserError(f"{info.path / 'config.json'}: no id2label; cannot name the classes")
    onnx = onnx_files(info.path)
    chosen = _pick_backend(info, onnx, backend)
    tokenizer = load_dir_tokenizer(info.path)
    max_length = resolve_max_length(info, tokenizer)
    if chosen == "torch":
        if num_threads:
            import torch

            torch.set_num_threads(num_threads)
        runner: Any = _TorchRunner(load_dir_model(info.path, info.task))
    else:
        runner = _OrtRunner(onnx[chosen], chosen, num_threads, spinning=ort_spinning)
    return task.predictor(info, tokenizer, runner, max_length)


def predictable_task(info: ModelDirInfo):
    """The task of a model dir that can be predicted with (and exported to ONNX): one with a Task.predictor;
    UserError naming the ones that have one otherwise."""
    task = get_task(info.task)
    if task.predictor is None:
        able = ", ".join(n for n in task_names() if get_task(n).predictor is not None)
        raise UserError(f"{info.path}: prediction supports {able} model dirs only (task={info.task!r})")
    return task


# ------------------------------------------------------------------------------------ token classification


class TokenPredictor(Predictor):
    """A token classifier (NER): each text's entities as character spans.

        load_predictor("runs/ner/student").predict(["EU rejects German call"])
        # [{"entities": [{"type": "ORG", "text": "EU", "start": 0, "end": 2, "score": 0.98},
        #                {"type": "MISC", "text": "German", "start": 11, "end": 17, "score": 0.95}]}]

    Words are the tokenizer's pre-tokenized words (whitespace and punctuation; each CJK character); a word's tag is
    the argmax at its first sub-token (as the model was trained), its span runs from its first sub-token's start to
    its last sub-token's end (the tokenizer's offset_mapping, characters of the input text). Tags decode as BIO:
    B-X starts an entity, I-X continues one of type X (or starts one, when it follows something else), O ends it.
    `score`: the mean probability of the tags of the entity's words. Needs a fast tokenizer (offsets, word ids).
    """

    def encode_tokens(self, texts: list[str]):
        """(model inputs, offsets (B, L, 2), word ids per text, truncated count) of one batch."""
        if not getattr(self.tokenizer, "is_fast", False):
            raise UserError(f"{self.info.path}: token classification needs a fast tokenizer (tokenizer.json)")
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                             return_offsets_mapping=True, return_tensors="np", split_special_tokens=True)
        offsets = enc.pop("offset_mapping")
        word_ids = [e.word_ids for e in enc.encodings]
        return {k: np.asarray(v) for k, v in enc.items()}, offsets, word_ids, sum(1 for e in enc.encodings
                                                                                     if e.overflowing)

    def predict_token_logits(self, texts: Sequence[str], batch_size: int = 32):
        """Per text, in input order: (logits (n_tokens, C) of its real tokens, offsets (n_tokens, 2), word ids);
        and the number of truncated texts."""
        texts = _check_texts(texts)
        if batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}")
        out: list = [None] * len(texts)
        n_truncated = 0
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch, offsets, word_ids, truncated = self.encode_tokens([texts[i] for i in idx])
            n_truncated += truncated
            logits = self.run_model(batch)
            for row, i in enumerate(idx):
                n = int(batch["attention_mask"][row].sum())
                out[i] = (logits[row, :n], offsets[row, :n], word_ids[row][:n])
        return out, n_truncated

    def predict_logits(self, texts: Sequence[str], batch_size: int = 32) -> tuple[np.ndarray, int]:
        """Every real token's logits, (Σ tokens, C), texts in input order (what export parity compares)."""
        per_text, n_truncated = self.predict_token_logits(texts, batch_size=batch_size)
        if not per_text:
            return np.zeros((0, len(self.labels)), dtype=np.float32), 0
        return np.concatenate([logits for logits, _, _ in per_text]), n_truncated

    def predict_counted(self, texts: Sequence[str], batch_size: int = 32) -> tuple[list[dict], int]:
        per_text, n_truncated = self.predict_token_logits(texts, batch_size=batch_size)
        return [{"entities": entity_spans(text, softmax(logits), offsets, word_ids, self.labels)}
                for text, (logits, offsets, word_ids) in zip(texts, per_text)], n_truncated


def entity_spans(text: str, probs: np.ndarray, offsets, word_ids: list, labels: list[str]) -> list[dict]:
    """BIO-decoded entities of one text from its tokens' tag probabilities (n_tokens, C): see TokenPredictor."""
    words: list[list] = []  # [start, end, tag, prob] per word, in order
    previous = None
    for t, w in enumerate(word_ids):
        if w is None:
            previous = None
            continue
        start, end = int(offsets[t][0]), int(offsets[t][1])
        if w != previous:
            k = int(probs[t].argmax())
            words.append([start, end, labels[k], float(probs[t][k])])
        else:
            words[-1][1] = max(words[-1][1], end)
        previous = w
    entities: list[dict] = []
    current = None
    for start, end, tag, prob in words:
        kind = tag[2:] if tag[:2] in ("B-", "I-") else None
        if kind is not None and tag.startswith("I-") and current is not None and current["type"] == kind:
            current["end"], current["probs"] = end, current["probs"] + [prob]
            continue
        if current is not None:
            entities.append(current)
        current = {"type": kind, "start": start, "end": end, "probs": [prob]} if kind else None
    if current is not None:
        entities.append(current)
    return [{"type": e["type"], "text": text[e["start"]:e["end"]], "start": e["start"], "end": e["end"],
             "score": float(np.mean(e["probs"]))} for e in entities]


# ------------------------------------------------------------------------------------ sentence embeddings


def pool_numpy(hidden: np.ndarray, attention_mask: np.ndarray, mode: str, normalize: bool) -> np.ndarray:
    """(B, L, D) last hidden states -> (B, D) sentence embeddings, as kdistill.features.pool does in torch (mean over
    the real tokens, position 0, or max over the real tokens; then L2-normalised when `normalize`), for every
    backend: an ONNX graph of a sentence encoder outputs the last hidden state, and torch is never loaded for it."""
    mask = attention_mask.astype(hidden.dtype)[..., None]  # (B, L, 1)
    if mode == "mean":
        out = (hidden * mask).sum(1) / np.clip(mask.sum(1), 1e-9, None)
    elif mode == "cls":
        out = hidden[:, 0]
    else:  # max
        out = np.where(mask > 0, hidden, np.finfo(hidden.dtype).min).max(1)
    if normalize:
        out = out / np.clip(np.linalg.norm(out, axis=-1, keepdims=True), 1e-12, None)
    return out.astype(np.float32, copy=False)


class EmbeddingPredictor(Predictor):
    """A sentence encoder (task embedding): one vector per text, pooled as its dir's sentence-transformers modules
    say (models.read_pooling), so the same as `SentenceTransformer(dir).encode(texts)`.

        load_predictor("runs/embedding/student").predict(["the team won the match"])
        # [{"embedding": [0.013, -0.094, ...]}]
    """

    def __init__(self, *, pooling, **kwargs):
        super().__init__(**kwargs)
        self.pooling = pooling

    @property
    def output_width(self) -> int:
        return int(self.info.config["hidden_size"])

    @property
    def metadata(self) -> dict[str, Any]:
        return {**super().metadata, "dim": self.output_width,
                "pooling": {"mode": self.pooling.mode, "normalize": self.pooling.normalize}}

    def run_model(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """Pooled embeddings (B, D) of one batch from encode()."""
        return pool_numpy(self._runner(batch), batch["attention_mask"], self.pooling.mode, self.pooling.normalize)

    def predict_counted(self, texts: Sequence[str], batch_size: int = 32) -> tuple[list[dict], int]:
        vectors, n_truncated = self.predict_logits(texts, batch_size=batch_size)  # (N, D): the pooled embeddings
        return [{"embedding": row.tolist()} for row in vectors], n_truncated


# --------------------------------------------------------------------------------------------- files


def read_jsonl_texts(path: str | os.PathLike, *, text_field: str = "text") -> tuple[list[dict], list[str]]:
    """Rows and their texts from a JSONL file; blank lines are skipped; errors name the file and line."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"input {path} is a folder; give a JSONL file")
    if not path.is_file():
        raise UserError(f"input file not found: {path}")
    rows, texts = [], []
    # a BOM is dropped; lines end at \r\n, \r or \n (never raw inside a JSON string), not at U+2028 (which may be)
    for lineno, line in enumerate(LINE_BREAK.split(decode_utf8(path.read_bytes(), str(path))), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}:{lineno}: expected a JSON object with a {text_field!r} field")
        if not isinstance(row.get(text_field), str):
            raise UserError(f"{path}:{lineno}: field {text_field!r} missing or not a string")
        encode_utf8(row[text_field], f"{path}:{lineno}: field {text_field!r}")
        rows.append(row)
        texts.append(row[text_field])
    return rows, texts


def check_output_file(path: str | os.PathLike, example: str = "predictions.jsonl", *, overwrite: bool = False,
                      needed_bytes: int | None = None) -> None:
    """UserError when the output file `path` is an existing folder, an existing file the user did not say may be
    replaced (`overwrite`), or cannot be written there (or not `needed_bytes` of it: kdistill.io.check_writable);
    called before any work is done."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"output {path} is a folder, not a file; give a file path such as {path / example}")
    if path.exists() and not overwrite:
        raise UserError(f"output {path} exists; give a new path, or pass --overwrite to replace it")
    check_writable(path, needed_bytes)


def write_jsonl_atomic(path: str | os.PathLike, records: Sequence[dict]) -> None:
    """Write records as JSONL atomically (temp file + rename): readers never see half a file."""
    path = Path(path)
    if not path.parent.is_dir():
        raise UserError(f"output folder not found: {path.parent}")
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    check_writable(path, len(text.encode("utf-8")))  # the exact size, before a byte is written
    with output_errors(path):  # a disk that fills up meanwhile: one line naming `path`, no temp file left
        atomic_write_text(path, text)


def predict_file(
    model_dir: str | os.PathLike,
    in_path: str | os.PathLike,
    out_path: str | os.PathLike | None = None,
    *,
    batch_size: int = 32,
    text_field: str = "text",
    backend: Backend = "auto",
    overwrite: bool = False,
) -> list[dict]:
    """Predict every line of a JSONL file (objects with a "text" field).

    Each output line is the input object with a "prediction" field added ({"label", "label_name",
    "probabilities"}; kept apart so a gold "label" in the input is not overwritten). Written atomically to
    out_path, or to stdout when out_path is None. Returns the output records.
    """
    if out_path is not None:  # each output line holds its input line and more: the input's size at least
        check_output_file(out_path, overwrite=overwrite,
                          needed_bytes=os.path.getsize(in_path) if os.path.isfile(in_path) else None)
    rows, texts = read_jsonl_texts(in_path, text_field=text_field)
    predictor = load_predictor(model_dir, backend=backend)
    preds = predictor.predict(texts, batch_size=batch_size)
    records = [{**row, "prediction": p} for row, p in zip(rows, preds)]
    if out_path is None:
        for r in records:
            sys.stdout.write(json.dumps(r, ensure_ascii=False) + "\n")
        sys.stdout.flush()
    else:
        write_jsonl_atomic(out_path, records)
    return records
