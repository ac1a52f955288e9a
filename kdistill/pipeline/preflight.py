"""Every check the recipe, the teacher's config.json and the file system allow before the data is read, the run
dir created or anything trained."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig, AutoTokenizer, BertConfig

from kdistill.config import RunConfig
from kdistill.errors import UserError
from kdistill.models import BUILTIN_MODELS, load_tokenizer, require_safetensors, resolve_model_source
from kdistill.pipeline.students import check_relation_heads, is_shaped, student_layers
from kdistill.rundir import check_run_dir
from kdistill.student import num_layers_of, resolve_widths
from kdistill.task import get_task
from kdistill.terms import TermSpec, layer_pairs
from kdistill.tokenization import tokenizer_from_vocab


def check_paths(cfg: RunConfig) -> None:
    """Model dirs and the vocab named in the recipe exist, and model dirs hold safetensors weights (loading never
    unpickles), before the data is read or the run dir created."""
    student_dir = cfg.student.model if cfg.student.model not in BUILTIN_MODELS else None
    teacher_dir = cfg.teacher.model if not cfg.teacher.path and cfg.teacher.from_scratch is None and \
        cfg.teacher.model and Path(cfg.teacher.model).is_dir() else None
    named = [("teacher.path", cfg.teacher.path), ("teacher.model", teacher_dir), ("student.model", student_dir)]
    named += [(f"distill.extra_teachers[{i}]", p) for i, p in enumerate(cfg.distill.extra_teachers)]
    for key, path in named:
        if path and not (Path(path) / "config.json").is_file():
            raise UserError(f"{key}: {path} is not a model dir (no config.json)")
        if path:
            try:
                require_safetensors(path)
            except UserError as e:
                raise UserError(f"{key}: {e}") from None
    scratch = cfg.teacher.from_scratch
    if scratch is not None and scratch.tokenizer not in ("wordpiece", "bert-base-chinese"):
        tokenizer_from_vocab(scratch.tokenizer)  # a ConfigError: missing, unreadable, not UTF-8, no special tokens

def input_paths(cfg: RunConfig) -> dict[str, str | None]:
    """Recipe key -> a file or dir the run reads."""
    scratch = cfg.teacher.from_scratch
    paths = {"data.train_file": cfg.data.train_file, "data.validation_file": cfg.data.validation_file,
             "data.test_file": cfg.data.test_file, "data.unlabeled_file": cfg.data.unlabeled_file,
             "teacher.path": cfg.teacher.path,
             "teacher.model": cfg.teacher.model,
             "teacher.llm.model": cfg.teacher.llm.model if cfg.teacher.llm else None,
             "student.model": cfg.student.model if cfg.student.model not in BUILTIN_MODELS else None,
             "teacher.from_scratch.tokenizer": scratch.tokenizer if scratch else None}
    return paths | {f"distill.extra_teachers[{i}]": p for i, p in enumerate(cfg.distill.extra_teachers)}

def teacher_config(cfg: RunConfig):
    """The teacher's transformers config, read without its weights: its config.json, or a from-scratch teacher's
    shape from the recipe. None where only loading tells (a hub id, a GGUF file)."""
    scratch = cfg.teacher.from_scratch
    if scratch is not None and not cfg.teacher.path:
        return BertConfig(hidden_size=scratch.hidden_size, num_hidden_layers=scratch.num_hidden_layers,
                          num_attention_heads=scratch.num_attention_heads, intermediate_size=scratch.intermediate_size,
                          max_position_embeddings=max(512, cfg.data.max_length))  # as from_scratch_classifier
    if cfg.teacher.path:
        source, extra = cfg.teacher.path, {}
    elif cfg.teacher.model:
        source, extra = resolve_model_source(cfg.teacher.model)  # a missing local dir fails here
    else:
        return None
    if extra or not (Path(source) / "config.json").is_file():
        return None
    return AutoConfig.from_pretrained(source, trust_remote_code=False)

def check_shapes(cfg: RunConfig, *, distilling: bool = True) -> None:
    """What the teacher's config decides, checked before any training: the position limit, and (`distilling`)
    the student's layers and widths, the layer mapping and the relation heads."""
    config = teacher_config(cfg)
    if config is None:
        return
    key = get_task(cfg.task).length_key  # data.max_length, or a causal LM's data.block_size
    length = getattr(cfg.data, key.removeprefix("data."))
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and length > limit:
        raise UserError(f"{key}: {length} exceeds the teacher's {limit} positions (max_position_embeddings); "
                        f"set {key} <= {limit}")
    if not distilling:
        return
    try:
        t_layers = num_layers_of(config)
    except NotImplementedError:
        return  # an architecture without num_hidden_layers: make_student says so
    s = cfg.student
    source = config  # what the student is cut from: the teacher, or a student.model pruned by the shape keys
    if s.model:
        source = AutoConfig.from_pretrained(resolve_model_source(s.model)[0], trust_remote_code=False)
    if s.model and not is_shaped(s):
        s_layers, s_hidden, init_layers = num_layers_of(source), source.hidden_size, None
    else:
        layers = student_layers(s, num_layers_of(source))
        try:
            s_hidden = resolve_widths(source, hidden_size=s.hidden_size, num_attention_heads=s.num_attention_heads,
                                      num_key_value_heads=s.num_key_value_heads,
                                      intermediate_size=s.intermediate_size).get("hidden_size", source.hidden_size)
        except ValueError as e:
            raise UserError(f"student.{e}") from None
        s_layers, init_layers = len(layers), (layers if s.init != "random" and not s.model else None)
    try:
        pairs = layer_pairs(cfg.distill.layer_mapping, student_layers=s_layers, teacher_layers=t_layers,
                            init_layers=init_layers)
    except ValueError as e:
        raise UserError(str(e)) from None
    check_relation_heads(TermSpec.of_recipe(cfg.distill.losses, pairs, cfg.distill),
                         s_hidden, config.hidden_size)

def preflight(cfg: RunConfig, run_dir: Path, *, resume: bool = False, overwrite: bool = False,
              distilling: bool = True) -> None:
    """Every check that the recipe, the teacher's config.json and the file system allow, before the data is read,
    the run dir created or anything trained: the task's own (Task.preflight), then the paths, shapes and run
    dir."""
    task = get_task(cfg.task)
    task.preflight(cfg, distilling=distilling)
    check_paths(cfg)
    task.preflight_files(cfg, distilling=distilling)
    check_shapes(cfg, distilling=distilling)
    check_run_dir(run_dir, input_paths(cfg), resume=resume, overwrite=overwrite)

def recipe_teacher_tokenizer(cfg: RunConfig):
    """The teacher's tokenizer where the recipe tells it before any data is read; None for a WordPiece trained on
    the data (and bert-base-chinese's, read from a package when the teacher is built)."""
    scratch = cfg.teacher.from_scratch
    if cfg.teacher.path:
        return AutoTokenizer.from_pretrained(cfg.teacher.path, trust_remote_code=False)
    if scratch is None:
        return load_tokenizer(cfg.teacher.model) if cfg.teacher.model else None
    if scratch.tokenizer in ("wordpiece", "bert-base-chinese"):
        return None
    return tokenizer_from_vocab(scratch.tokenizer, lowercase=scratch.lowercase, model_max_length=cfg.data.max_length)
