"""The whole pipeline as plain functions: data -> teacher -> student init -> distillation -> evaluation -> report.

Each step writes into the run directory (see README "Run directory"); the CLI verbs call these functions.
"""

from __future__ import annotations

import copy
import errno
import json
import logging
import socket
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch
from datasets import DatasetDict, concatenate_datasets
from safetensors import SafetensorError
from transformers import AutoConfig, AutoTokenizer, BertConfig

from kdistill.augment import with_transfer
from kdistill.cache import (
    FORMAT_VERSION,
    TopKCache,
    build_topk_cache,
    check_signal_dir,
    default_cache_root,
    open_teacher_signal,
    topk_key,
)
from kdistill.checkpoint import Checkpoints
from kdistill.config import DataConfig, EvalConfig, RunConfig, StudentConfig, parse_override, validate_config
from kdistill.data import (
    BUILTIN_DATASETS,
    SPLITS,
    TOKEN_DATASETS,
    UNLABELED,
    DataBundle,
    Encodings,
    LMBlocks,
    LMCorpus,
    join_words,
    load_data,
    load_lm_corpus,
    load_token_data,
    encode_blocks,
    pack_blocks,
    pad_id_of,
    text_blocks,
    tokenize_splits,
)
from kdistill.deploy.export import export_model
from kdistill.distill.alternating import distill_alternating
from kdistill.distill.causal import distill_causal, lm_only_spec, with_alignment, with_targets
from kdistill.distill.explicit import distill_explicit, why_not_cached
from kdistill.distill.mutual import distill_mutual
from kdistill.errors import UserError
from kdistill.features import Pooling
from kdistill.evaluate import (
    block_parameters,
    compare_lm_speed,
    compare_speed,
    embed,
    embedding_metrics,
    evaluate_lm_model,
    evaluate_model,
    machine_info,
    sample_generations,
)
from kdistill.io import atomic_write_json
from kdistill.models import (
    BUILTIN_MODELS,
    dir_size_mb,
    inspect_model_dir,
    load_causal_lm,
    load_classifier,
    load_model_dir,
    load_tokenizer,
    read_meta,
    read_pooling,
    require_safetensors,
    resolve_model_source,
    save_model,
    save_sentence_encoder,
    seeded,
)
from kdistill.report import write_report
from kdistill.rundir import check_run_dir, run_dir_for, run_fingerprint
from kdistill.student import (
    build_student,
    check_layers,
    count_parameters,
    describe_student,
    num_layers_of,
    resolve_widths,
    select_layers,
)
from kdistill.teacher import finetune, load_causal_teacher, max_positions, train_teacher
from kdistill.terms import CROSS_TOKENIZER_TERMS, TERMS, TermSpec, check_terms, layer_pairs, split_stages
from kdistill.tokenalign import shared_vocab, token_byte_lengths
from kdistill.tokenization import tokenizer_from_vocab
from kdistill.training import History, is_main_process, world_size

log = logging.getLogger(__name__)


def default_run_dir(cfg: RunConfig) -> Path:
    return Path("runs") / cfg.name


def run_dir_of(cfg: RunConfig, out: str | Path | None) -> Path:
    return Path(out) if out else default_run_dir(cfg)


def training_data(data: DataBundle) -> dict:
    """What training reads (and a checkpoint depends on): the train and validation splits, for the fingerprint."""
    out = {split: data.splits[split].to_dict() for split in ("train", "validation")}
    return out | ({"unlabeled": data.unlabeled} if data.unlabeled else {})


WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


@contextmanager
def writing(run_dir: Path):
    """Disk full, quota, read-only or permission errors on the run dir become one line naming the path."""
    hint = f"free space or fix permissions, then continue with --resume {run_dir}"
    try:
        yield
    except OSError as e:
        inside = e.filename is None or Path(e.filename).resolve().is_relative_to(run_dir.resolve())
        if e.errno not in WRITE_ERRORS or not inside:
            raise
        raise UserError(f"cannot write {e.filename or run_dir}: {e.strerror}; {hint}") from None
    except SafetensorError as e:  # save_pretrained's weights: the OS error comes inside the message
        if not str(e).startswith("Error while serializing"):
            raise
        raise UserError(f"cannot write model weights in {run_dir}: {e}; {hint}") from None


def is_saved(model_dir: Path) -> bool:
    """A phase is done once its model dir is saved (save_model writes it atomically)."""
    return (model_dir / "model.safetensors").is_file()


def phase_checkpoints(cfg: RunConfig, run_dir: Path, phase: str, resume: bool,
                      fingerprint: dict | None) -> Checkpoints:
    return Checkpoints(run_dir / "checkpoints" / phase, every=cfg.train.checkpoint_every, resume=resume,
                       fingerprint=fingerprint)


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
    key, length = ("data.block_size", cfg.data.block_size) if cfg.task == "causal-lm" \
        else ("data.max_length", cfg.data.max_length)
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
    check_relation_heads(TermSpec(dict(cfg.distill.losses), pairs, relation_heads=cfg.distill.relation_heads),
                         s_hidden, config.hidden_size)


def check_relation_heads(spec: TermSpec, student_width: int, teacher_width: int) -> None:
    widths = {student_width, teacher_width}
    if spec.needs_qkv and any(w % spec.relation_heads for w in widths):
        raise UserError(f"distill.relation_heads: {spec.relation_heads} must divide both widths "
                        f"{sorted(widths)} for the minilm_* terms")


def preflight(cfg: RunConfig, run_dir: Path, *, resume: bool = False, overwrite: bool = False,
              distilling: bool = True) -> None:
    """Every check that the recipe, the teacher's config.json and the file system allow, before the data is read,
    the run dir created or anything trained."""
    if distilling and cfg.task == "causal-lm":
        check_causal_lm(cfg)
    if cfg.task == "embedding":
        check_embedding(cfg)
    check_paths(cfg)
    if distilling and cfg.student.model and cfg.task == "causal-lm" and cfg.teacher.model:
        lm_student_tokenizer(cfg, load_tokenizer(cfg.teacher.model))  # a mismatch without a method stops here
    if distilling and cfg.student.model and cfg.task == "classification":
        teacher_tokenizer = recipe_teacher_tokenizer(cfg)
        if teacher_tokenizer is not None:  # else run_phases checks, once the teacher's WordPiece is trained
            check_tokenizers(cfg, teacher_tokenizer, load_tokenizer(cfg.student.model))
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


POSITIONAL_TERMS = {name for name, term in TERMS.items() if term.positional}
"""Terms that compare the two models' states position by position: they need one tokenization for both."""


def check_tokenizers(cfg: RunConfig, teacher_tokenizer, student_tokenizer) -> bool:
    """Whether the student (student.model) reads another tokenization than the teacher (another vocabulary);
    UserError where the recipe cannot distil across the two."""
    if teacher_tokenizer.get_vocab() == student_tokenizer.get_vocab():
        return False
    why = f"student.model {cfg.student.model} has another vocabulary than the teacher"
    d = cfg.distill
    active = {term for term, weight in d.losses.items() if weight > 0}
    positional = sorted(active & POSITIONAL_TERMS)
    if positional:
        raise UserError(f"distill.losses: {positional} compare teacher and student position by position, but {why} "
                        "and the positions of two tokenizations do not align; use kd, ce (and cls_pkd) with it")
    if d.strategy != "explicit":
        raise UserError(f"distill.strategy: {d.strategy} runs the teacher on the student's batches, but {why}; "
                        "use explicit")
    if d.cache_teacher == "off":
        raise UserError(f"distill.cache_teacher: off, but {why}: the teacher's outputs are computed once over its "
                        "own tokenization and read back by example; use auto or on")
    for tokenizer in (teacher_tokenizer, student_tokenizer):
        reason = why_not_cached(TermSpec({term: 1.0 for term in active}, []), tokenizer)
        if reason:
            raise UserError(f"distill.losses: {why}, so the teacher's outputs must be cached, but {reason}")
    return True


def get_teacher(cfg: RunConfig, data: DataBundle, encodings: Encodings, run_dir: Path, *, resume: bool = False,
                fingerprint: dict | None = None):
    """(teacher, tokenizer, teacher dir, training history or None): a given trained teacher, or train one (a
    resumed run: the one it trained already, or continue training it). fingerprint: the run's, for checkpoints."""
    if cfg.teacher.path:
        path = Path(cfg.teacher.path)
        model, tokenizer, meta = load_model_dir(path)
        names = [model.config.id2label[i] for i in range(model.config.num_labels)]
        if names != data.label_names:
            raise UserError(f"teacher.path: {path} was trained on labels {names}, the data has {data.label_names}")
        return model, tokenizer, path, None
    teacher_dir = run_dir / "teacher"
    if resume and is_saved(teacher_dir):
        log.info("teacher: trained before the run was resumed, loaded from %s", teacher_dir)
        model, tokenizer, _ = load_model_dir(teacher_dir)
        return model, tokenizer, teacher_dir, None
    checkpoints = phase_checkpoints(cfg, run_dir, "teacher", resume, fingerprint)
    model, tokenizer, history = train_teacher(cfg, data, encodings, teacher_dir, log_dir=run_dir / "logs",
                                              checkpoints=checkpoints)
    if is_main_process():
        save_history(run_dir, history)
        checkpoints.clear()
    return model, tokenizer, teacher_dir, history


def save_history(run_dir: Path, history) -> None:
    atomic_write_json(run_dir / "logs" / f"history_{history.name}.json", history.to_dict())


def calibration_batch(encoded_train, tokenizer, n: int = 64) -> dict:
    rows = [{k: encoded_train[i][k] for k in encoded_train.column_names if k != "labels"}
            for i in range(min(n, len(encoded_train)))]
    return dict(tokenizer.pad(rows, return_tensors="pt"))


def student_layers(s: StudentConfig, teacher_layers: int) -> list[int]:
    """The teacher layers the student copies (student.layers: indices, or how many). layer_map importance ranks the
    blocks only when the teacher runs on the calibration batch (make_student); until then the uniform choice of as
    many layers stands in, since every check made before (preflight) depends on their number alone."""
    try:
        if isinstance(s.layers, list):
            return check_layers(s.layers, teacher_layers)
        return select_layers(teacher_layers, s.layers, "uniform" if s.layer_map == "importance" else s.layer_map)
    except ValueError as e:
        message = str(e)
        raise UserError(f"student.{message}" if message.startswith("layers") else f"student.layers: {message}") \
            from None


def student_reads(cfg: RunConfig, data: DataBundle, encodings: Encodings, tokenizer):
    """(the student's tokenizer, whether it differs from the teacher's `tokenizer`, the calibration batch of a
    student pruned from the teacher or a classification student.model, else None): a given student.model reads its
    own tokenizer, maybe another."""
    if cfg.student.model:
        student_tokenizer = load_tokenizer(cfg.student.model)
        cross = check_tokenizers(cfg, tokenizer, student_tokenizer)
        if cfg.task != "classification" or not is_shaped(cfg.student):
            return student_tokenizer, cross, None
        return student_tokenizer, cross, calibration_batch(
            encodings(data, student_tokenizer, ("train",))["train"], student_tokenizer)
    return tokenizer, False, calibration_batch(encodings(data, tokenizer, ("train",))["train"], tokenizer)


def make_student(cfg: RunConfig, teacher, calibration: dict | None):
    """The student the recipe describes, and the teacher layers it was copied from. A given student.model
    (classification) gets a head for the teacher's labels unless it has one for them already; a classification or
    causal-lm student.model with student.layers (or a width) is pruned like a teacher (`calibration`: its own
    tokens), e.g. 2 layers of a general-purpose pretrained encoder that never saw the task."""
    s = cfg.student
    source = teacher
    if s.model and cfg.task == "classification":
        labels = [teacher.config.id2label[i] for i in range(teacher.config.num_labels)]
        given = AutoConfig.from_pretrained(resolve_model_source(s.model)[0], trust_remote_code=False)
        trained = any(a.endswith("ForSequenceClassification") for a in given.architectures or [])
        names = [given.id2label[i] for i in range(given.num_labels)]
        if trained and names != labels:
            raise UserError(f"student.model: {s.model} was trained on labels {names}, the data has {labels}; give an "
                            "encoder without a classification head (it gets one for the data's labels)")
        with seeded(cfg.train.seed):  # a head new to the encoder
            source = load_classifier(s.model, labels)
    elif s.model and cfg.task == "causal-lm":  # a built-in alias, a GGUF file or a model dir
        source = load_causal_lm(s.model)
    elif s.model:
        student, _, _ = load_model_dir(s.model, task="embedding" if cfg.task == "embedding" else None)
        return student.train(), None
    if source is not teacher and not is_shaped(s):
        return source.train(), None
    # student.layers & co. with a student.model: that model is pruned, as a teacher-derived student would be
    student_layers(s, num_layers_of(source.config))  # a bad number or index fails here, naming student.layers
    depth = {"layers": s.layers} if isinstance(s.layers, list) else {"num_layers": s.layers, "layer_map": s.layer_map}
    try:
        student = build_student(source, **depth, hidden_size=s.hidden_size,
                                num_attention_heads=s.num_attention_heads, num_key_value_heads=s.num_key_value_heads,
                                intermediate_size=s.intermediate_size,
                                init=s.init, calibration_inputs=calibration, seed=cfg.train.seed)
    except (ValueError, NotImplementedError) as e:
        raise UserError(f"student: {e}") from None
    if source is not teacher:  # its "teacher_layers" are this model's, not the teacher's
        student.kdistill_init["source"] = s.model
        log.info("student: cut from student.model %s", s.model)
    copied = student.kdistill_init["teacher_layers"] if s.init != "random" and source is teacher else None
    return student.train(), copied


SHAPE_KEYS = frozenset({"layers", "layer_map", "hidden_size", "num_attention_heads", "num_key_value_heads",
                        "intermediate_size", "init"})
"""student keys that shape a student derived from a model (the teacher, or a classification or causal-lm
student.model)."""


def is_shaped(student_cfg) -> bool:
    """Whether the recipe sets a student shape key: then a student.model is pruned by them, else taken whole."""
    return bool(student_cfg.model_fields_set & SHAPE_KEYS)


def term_spec(cfg: RunConfig, teacher, student, init_layers) -> TermSpec:
    try:
        pairs = layer_pairs(cfg.distill.layer_mapping, student_layers=num_layers_of(student.config),
                            teacher_layers=num_layers_of(teacher.config), init_layers=init_layers)
    except ValueError as e:
        raise UserError(str(e)) from None
    spec = TermSpec(dict(cfg.distill.losses), pairs, relation_heads=cfg.distill.relation_heads,
                    gjsd_beta=cfg.distill.gjsd_beta, skew_alpha=cfg.distill.skew_alpha)
    check_relation_heads(spec, student.config.hidden_size, teacher.config.hidden_size)
    with seeded(cfg.train.seed):  # the projections start the same in every run and every process
        spec.add_projections(student.config.hidden_size, teacher.config.hidden_size)
    return spec


def distill_student(cfg: RunConfig, teacher, tokenizer, encoded: DatasetDict, run_dir: Path, init_layers, student,
                    checkpoints: Checkpoints | None = None, teacher_tokenizer=None, teacher_train=None,
                    pooling: Pooling | None = None):
    """Run the configured strategy; returns the student's history (and the teacher's, if it kept learning).
    `tokenizer`, `encoded`: the student's tokenizer and splits; `teacher_tokenizer`, `teacher_train`: the teachers'
    tokenizer and training split, where they differ (explicit only, check_tokenizers). `pooling`: task embedding
    (explicit only: the student learns the teacher's pooled sentence embeddings)."""
    spec = term_spec(cfg, teacher, student, init_layers)
    extra = [load_model_dir(p)[0] for p in cfg.distill.extra_teachers]
    common = dict(spec=spec, distill=cfg.distill, train=cfg.train, log_dir=run_dir / "logs", checkpoints=checkpoints)
    strategy = cfg.distill.strategy
    if strategy == "explicit":
        # work_dir: the teacher hidden-state cache goes on the run dir's disk, not in a possibly small $TMPDIR
        explicit = partial(distill_explicit, student, [teacher, *extra], tokenizer, encoded, work_dir=run_dir,
                           teacher_tokenizer=teacher_tokenizer, teacher_train=teacher_train, pooling=pooling)
        if cfg.distill.intermediate_epochs is None:
            return explicit(name="student", **common), None
        return distill_two_stages(cfg, explicit, run_dir, **common), None
    if extra:
        raise UserError(f"distill.extra_teachers works with strategy explicit, not {strategy}")
    if strategy == "mutual":
        return distill_mutual(student, teacher, tokenizer, encoded, **common)
    return distill_alternating(student, teacher, tokenizer, encoded, **common)


def distill_two_stages(cfg: RunConfig, explicit: Callable[..., History], run_dir: Path, *, spec: TermSpec,
                       checkpoints: Checkpoints | None, **common) -> History:
    """TinyBERT's two stages (distill.intermediate_epochs): the intermediate terms alone, keeping the final weights,
    then the prediction terms for train.epochs. `explicit`: distill_explicit with its models and data bound.
    Returns the second stage's history, with the training time of both."""
    intermediate, prediction = split_stages(spec.weights)
    if checkpoints is not None and checkpoints.resume and checkpoints.latest() is not None:
        log.info("student: the intermediate stage ended before the run was resumed; the prediction stage continues")
        first_seconds = 0.0  # (its time is not in the second stage's checkpoint)
    else:
        first_train = cfg.train.model_copy(update=dict(epochs=cfg.distill.intermediate_epochs, max_steps=None,
                                                       early_stopping_patience=None))
        first = explicit(name="student-intermediate", spec=replace(spec, weights=intermediate), train=first_train,
                         checkpoints=checkpoints.stage("intermediate") if checkpoints else None, keep_best=False,
                         **{k: v for k, v in common.items() if k != "train"})
        if is_main_process():
            save_history(run_dir, first)
        first_seconds = first.wall_time_s
    history = explicit(name="student", spec=replace(spec, weights=prediction), checkpoints=checkpoints, **common)
    history.wall_time_s += first_seconds  # the student's training time: both stages
    return history


def run(cfg: RunConfig, out: str | Path | None = None, *, resume: bool = False, overwrite: bool = False) -> Path:
    """`kdistill run`: the whole pipeline; returns the run directory.

    resume: `out` is a run dir a killed run left; phases whose model is saved are skipped, the phase it was in
    continues from its last checkpoint. overwrite: `out` may hold files; the outputs of an earlier run there are
    removed first (rundir.py), other files are kept. Several processes (torchrun / accelerate launch) train
    together; the main process alone writes files and evaluates."""
    if cfg.task == "causal-lm":
        return run_causal_lm(cfg, out, resume=resume, overwrite=overwrite)
    phases = run_embedding_phases if cfg.task == "embedding" else run_phases
    started = time.perf_counter()
    run_dir = run_dir_of(cfg, out)
    preflight(cfg, run_dir, resume=resume, overwrite=overwrite)  # bad input fails before anything is written
    data = load_task_data(cfg)
    log.info("data: %s; world size %d", json.dumps(data.summary()["sizes"]), world_size())
    fp = run_fingerprint(cfg, training_data(data))
    with run_dir_for(cfg, run_dir, fp, resume=resume, overwrite=overwrite), writing(run_dir):
        return phases(cfg, data, run_dir, resume=resume, started=started, fingerprint=fp)


def run_phases(cfg: RunConfig, data: DataBundle, run_dir: Path, *, resume: bool, started: float,
               fingerprint: dict) -> Path:
    """Teacher, student, teacher_after, baseline; then evaluation, export and report (main process). Each split is
    tokenized once per tokenizer (data.Encodings) and handed to every phase that reads it."""
    main = is_main_process()
    encodings = Encodings(cfg.data.max_length, cfg.data.label_all_subtokens)
    teacher, tokenizer, teacher_dir, _ = get_teacher(cfg, data, encodings, run_dir, resume=resume,
                                                     fingerprint=fingerprint)
    student_data = with_transfer(data, cfg.data, teacher, tokenizer)  # augmentation reads the teacher's embeddings
    teacher_before = None
    if cfg.distill.strategy != "explicit":
        # the teacher keeps learning: keep its pre-distillation weights to report both
        teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}

    student_tokenizer, cross, calibration = student_reads(cfg, data, encodings, tokenizer)
    student, init_layers = make_student(cfg, teacher, calibration)
    shapes = describe_student(teacher, student)
    baseline_init = {k: v.clone() for k, v in student.state_dict().items()} if cfg.distill.baseline else None

    models = {"teacher": (teacher_dir, None), "student": (run_dir / "student", None)}
    learns_too = cfg.distill.strategy != "explicit"  # the teacher kept learning: teacher_after
    if resume and is_saved(run_dir / "student") and (not learns_too or is_saved(run_dir / "teacher_after")):
        log.info("student: distilled before the run was resumed (%s)", run_dir / "student")
        if learns_too:
            models["teacher_after"] = (run_dir / "teacher_after", None)
    else:
        checkpoints = phase_checkpoints(cfg, run_dir, "student", resume, fingerprint)
        teacher_train = encodings(student_data, tokenizer, ("train",))["train"] if cross else None
        history, teacher_history = distill_student(cfg, teacher, student_tokenizer,
                                                   encodings(student_data, student_tokenizer), run_dir, init_layers,
                                                   student, checkpoints, teacher_tokenizer=tokenizer if cross else None,
                                                   teacher_train=teacher_train)
        models["student"] = (run_dir / "student", history)
        meta = {"task": cfg.task, "max_length": cfg.data.max_length, "strategy": cfg.distill.strategy,
                "losses": cfg.distill.losses, "student_init": shapes["init"],
                "train_wall_time_s": history.wall_time_s}
        if main:
            save_history(run_dir, history)
            save_model(student, student_tokenizer, run_dir / "student", {"role": "student", **meta})
            checkpoints.clear()
        if teacher_history is not None:
            if main:
                save_history(run_dir, teacher_history)
                save_model(teacher, tokenizer, run_dir / "teacher_after",
                           {"role": "teacher after " + cfg.distill.strategy, "task": cfg.task,
                            "max_length": cfg.data.max_length})
            models["teacher_after"] = (run_dir / "teacher_after", teacher_history)
            teacher.load_state_dict(teacher_before)

    if baseline_init is not None and resume and is_saved(run_dir / "baseline"):
        log.info("baseline: trained before the run was resumed (%s)", run_dir / "baseline")
        models["baseline"] = (run_dir / "baseline", None)
    elif baseline_init is not None:
        student.load_state_dict(baseline_init)  # same shape, same init: the loss is the only difference
        checkpoints = phase_checkpoints(cfg, run_dir, "baseline", resume, fingerprint)
        baseline_history = finetune(student, student_tokenizer, encodings(data, student_tokenizer), cfg.train,
                                    name="baseline", log_dir=run_dir / "logs", checkpoints=checkpoints)
        if main:
            save_history(run_dir, baseline_history)
            save_model(student, student_tokenizer, run_dir / "baseline",
                       {"role": "no-KD baseline", "task": cfg.task, "max_length": cfg.data.max_length,
                        "train_wall_time_s": baseline_history.wall_time_s})
            checkpoints.clear()
        models["baseline"] = (run_dir / "baseline", baseline_history)

    if not main:  # evaluation, export and report: the main process alone
        return run_dir
    metrics = evaluate_run(cfg, run_dir, models, student_data, shapes, encodings)  # (data summary: transfer rows)
    return finish_run(cfg, run_dir, data, metrics, started)


def finish_run(cfg: RunConfig, run_dir: Path, data: DataBundle, metrics: dict, started: float) -> Path:
    """An encoder run's last steps (main process): export the student, then metrics.json and the report."""
    if cfg.export.formats:
        metrics["exports"] = export_student(cfg, run_dir, data)
    metrics["total_wall_time_s"] = time.perf_counter() - started
    atomic_write_json(run_dir / "metrics.json", metrics)
    write_report([run_dir])
    return run_dir


def evaluate_run(cfg: RunConfig, run_dir: Path, models: dict, data: DataBundle, shapes: dict | None,
                 encodings: Encodings) -> dict:
    """Every model of the run on the same test split, each in its own tokenization (a student.model may read
    another than the teacher); speed measured side by side, interleaved."""
    loaded, inputs = {}, {}
    for name, (path, _) in models.items():
        loaded[name], tokenizer, _ = load_model_dir(path)
        inputs[name] = (encodings(data, tokenizer, ("test",))["test"], tokenizer)
    results = {}
    for name, model in loaded.items():
        path, history = models[name]
        encoded_test, tokenizer = inputs[name]
        results[name] = evaluate_model(model, tokenizer, encoded_test, data.label_names, cfg.eval, path,
                                       speed=False)
        results[name]["train_wall_time_s"] = history.wall_time_s if history else \
            read_meta(path).get("train_wall_time_s")
    speed = compare_speed(loaded, inputs, cfg.eval)
    for name, numbers in speed.items():
        results[name].update(numbers)
    teacher = results.get("teacher", next(iter(results.values())))
    for name, r in results.items():
        r["accuracy_retained_pct"] = 100 * r["accuracy"] / teacher["accuracy"] if teacher["accuracy"] else None
        if "entity_f1" in r:  # token classification: the headline number
            r["entity_f1_retained_pct"] = 100 * r["entity_f1"] / teacher["entity_f1"] if teacher["entity_f1"] else None
        r["speedup_vs_teacher"] = teacher["latency_ms_batch1"] / r["latency_ms_batch1"]
        r["size_ratio_vs_teacher"] = teacher["params"] / r["params"]
    return run_metrics(cfg, data, shapes, results)


def run_metrics(cfg: RunConfig, data: DataBundle, shapes: dict | None, results: dict, **units: str) -> dict:
    """metrics.json of a run: its models' numbers (`results`), what it ran on, and the units (`units`: more)."""
    return {
        "run": cfg.name,
        "task": cfg.task,
        "strategy": cfg.distill.strategy,
        "data": data.summary(),
        "student_shape": shapes,
        "models": results,
        "machine": {**machine_info(), "host": socket.gethostname(), "eval_threads": cfg.eval.num_threads
                    or torch.get_num_threads(), "world_size": world_size()},
        "units": {"latency_ms_batch1": "ms", "throughput_per_s": "examples/s", "size_mb": "MiB",
                  "train_wall_time_s": "s", **units},
    }


def export_student(cfg: RunConfig, run_dir: Path, data: DataBundle) -> dict:
    """Export the run's student in each of export.formats, each with a parity check on the test split's texts
    (and, for a classifier, its labels)."""
    if cfg.task == "token-classification":  # parity on the test sentences' text
        texts, labels = sentence_texts(data.splits["test"]), None
    elif cfg.task == "embedding":  # parity on the pooled vectors
        texts, labels = list(data.splits["test"]["text"]), None
    else:
        texts, labels = list(data.splits["test"]["text"]), list(data.splits["test"]["label"])
    out = {}
    for fmt in cfg.export.formats:
        kind, quant = ("onnx", "int8") if fmt == "onnx-int8" else (fmt, None)
        # overwrite: the run dir is this run's (rundir.py), so an export dir there is one its killed attempt left
        out[fmt] = export_model(run_dir / "student", fmt=kind, out_dir=run_dir / "export" / fmt, quantize=quant,
                                parity_texts=texts, parity_labels=labels, overwrite=True)
    return out


# ------------------------------------------------------------------------------------- token classification

def load_task_data(cfg: RunConfig) -> DataBundle:
    """The run's splits: sentences with a tag per word (task: token-classification), else texts with a label."""
    return load_token_data(cfg.data) if cfg.task == "token-classification" else load_data(cfg.data)


def token_data_for_model(model_dir: Path, names: list[str], data: DataBundle, spec: str) -> DataBundle:
    """`data`'s tag ids renumbered to the model's (`names`, its id2label); UserError when the tag sets differ."""
    if sorted(names) != sorted(data.label_names):
        raise UserError(f"{model_dir}: model tags {names} differ from the data's {data.label_names} ({spec})")
    if names != data.label_names:
        remap = [names.index(n) for n in data.label_names]
        data.splits = data.splits.map(lambda r: {"tags": [remap[t] for t in r["tags"]]})
        data.label_names = names
    return data


def sentence_texts(split, limit: int = 256) -> list[str]:
    """Plain texts of (the first `limit`) sentences of a token split, its words joined by spaces (without spaces
    between CJK characters, as written): what predict and serve read."""
    return [join_words(words) for words in split["tokens"][:limit]]


# ------------------------------------------------------------------------------------------------ causal LM

def check_causal_lm(cfg: RunConfig) -> None:
    """What a causal-LM run supports: token-level loss terms, the explicit strategy, one teacher."""
    try:
        check_terms(cfg.distill.losses, "causal-lm")
    except ValueError as e:
        raise UserError(f"distill.losses: {e}") from None
    if cfg.distill.strategy != "explicit":
        raise UserError(f"distill.strategy: causal-lm supports explicit (a frozen teacher), not "
                        f"{cfg.distill.strategy}")
    if cfg.distill.on_policy_fraction + cfg.distill.seq_kd_fraction > 1:
        raise UserError("distill.on_policy_fraction + distill.seq_kd_fraction must be <= 1 (they are the "
                        "probabilities that a step trains on student / teacher generations)")
    if cfg.distill.extra_teachers:
        raise UserError("distill.extra_teachers: not supported for causal-lm")


def run_causal_lm(cfg: RunConfig, out: str | Path | None = None, *, resume: bool = False,
                  overwrite: bool = False) -> Path:
    """`kdistill run` for `task: causal-lm`: corpus -> packed blocks -> the given teacher (+ top-k cache) ->
    student -> KD and no-KD training -> perplexity, speed, sample generations -> metrics.json + report. Returns the
    run directory (created once data and teacher are loaded). resume, overwrite: as `run`."""
    started = time.perf_counter()
    run_dir = run_dir_of(cfg, out)
    preflight(cfg, run_dir, resume=resume, overwrite=overwrite)
    corpus = load_lm_corpus(cfg.data)
    teacher, tokenizer, teacher_name, teacher_file_mb = load_causal_teacher(cfg)
    data = lm_data(cfg, corpus, teacher, tokenizer)
    fingerprint = run_fingerprint(cfg, {s: corpus.docs[s] for s in ("train", "validation")})
    with run_dir_for(cfg, run_dir, fingerprint, resume=resume, overwrite=overwrite), writing(run_dir):
        return run_lm_phases(cfg, run_dir, corpus, data, teacher, tokenizer, teacher_name, teacher_file_mb, started,
                             resume=resume, fingerprint=fingerprint)


def lm_data(cfg: RunConfig, corpus: LMCorpus, teacher, tokenizer) -> LMData:
    """The corpus cut into blocks for each model: documents packed in the one tokenizer, or, across tokenizers,
    the same text pieces in the student's and the teacher's tokens."""
    student_tokenizer, cross = lm_student_tokenizer(cfg, tokenizer)
    limit = max_positions(teacher.config)
    if limit is not None and cfg.data.block_size > limit:
        raise UserError(f"data.block_size: {cfg.data.block_size} exceeds the teacher's {limit} positions")
    if cross:
        pieces = {s: text_blocks(corpus.docs[s], student_tokenizer, cfg.data.block_size) for s in SPLITS}
        blocks = {s: encode_blocks(pieces[s], student_tokenizer, cfg.data.block_size) for s in SPLITS}
        teacher_blocks = {s: encode_blocks(pieces[s], tokenizer, limit) for s in SPLITS}
    else:
        blocks = {s: pack_blocks(corpus.docs[s], student_tokenizer, cfg.data.block_size) for s in SPLITS}
        teacher_blocks = blocks
    log.info("data: %s documents -> %s blocks of %d tokens%s", corpus.summary()["documents"],
             {s: len(b) for s, b in blocks.items()}, cfg.data.block_size,
             f" (the teacher's tokens: up to {teacher_blocks['train'].input_ids.shape[1]})" if cross else "")
    return LMData(blocks, teacher_blocks, student_tokenizer)


def build_teacher_signal(cfg: RunConfig, teacher, data: LMData, path: str | Path | None = None) -> TopKCache:
    """The teacher signal of the run's training blocks: opened where complete, else computed (missing shards
    only). path: its dir (default: the automatic cache's dir of its key). Every process calls it."""
    train = data.teacher_blocks["train"]
    return build_topk_cache(teacher, train.input_ids, train.attention_mask, k=cfg.distill.cache_top_k,
                            root=default_cache_root(), path=path, batch_size=max(1, cfg.train.batch_size),
                            autocast_dtype=torch.bfloat16 if cfg.train.mixed_precision == "bf16" else None,
                            ends=train.ends if data.cross else None)  # across tokenizers the student aligns to them


def signal_run(cfg: RunConfig, out: str | Path | None = None) -> Path:
    """`kdistill teacher-signal`: run the recipe's teacher once over its training blocks and write the teacher
    signal (Parquet shards + manifest.json) to `out`, or to the automatic cache, where `kdistill run` finds it; a
    signal in `out` takes `--set distill.teacher_signal=<out>`. Resumes a killed build; under torchrun /
    accelerate launch each process computes its share of the shards. Returns the signal's dir."""
    if cfg.task != "causal-lm":
        raise UserError(f"task: the teacher signal is for causal-lm recipes, not {cfg.task}")
    check_causal_lm(cfg)
    if out is not None:
        check_signal_dir(out)
    corpus = load_lm_corpus(cfg.data)
    teacher, tokenizer, _, _ = load_causal_teacher(cfg)
    data = lm_data(cfg, corpus, teacher, tokenizer)
    t0 = time.perf_counter()
    signal = build_teacher_signal(cfg, teacher, data, out)  # refuses an --out holding another key's signal
    log.info("teacher signal %s: %d blocks, k=%d, %s in %.0f s", signal.path, len(signal), signal.k,
             "already complete" if signal.reused else "written", time.perf_counter() - t0)
    return Path(signal.path)


@dataclass
class LMData:
    """A causal-LM run's blocks as each model reads them: the student's, and the teacher's (the same object when
    they share a tokenizer; else the same text pieces in the teacher's tokens, with byte ends)."""

    blocks: dict[str, LMBlocks]
    teacher_blocks: dict[str, LMBlocks]
    student_tokenizer: object

    @property
    def cross(self) -> bool:
        return self.teacher_blocks is not self.blocks


def lm_student_tokenizer(cfg: RunConfig, teacher_tokenizer):
    """(the student's tokenizer, whether the run distils across tokenizers): a student.model reads its own; a
    student built from the teacher reads the teacher's. Across tokenizers only with a cross-tokenizer term."""
    cross_terms = sorted(t for t, w in cfg.distill.losses.items() if w > 0 and t in CROSS_TOKENIZER_TERMS)
    if not cfg.student.model:
        return teacher_tokenizer, False  # (config: a cross-tokenizer term needs a student.model)
    student_tokenizer = load_tokenizer(cfg.student.model)
    if student_tokenizer.pad_token_id is None:
        student_tokenizer.pad_token = student_tokenizer.eos_token
    differ = student_tokenizer.get_vocab() != teacher_tokenizer.get_vocab()
    if differ and not cross_terms:
        raise UserError(f"student.model: {cfg.student.model} has another tokenizer than the teacher "
                        f"({len(student_tokenizer)} vs {len(teacher_tokenizer)} tokens), so the terms "
                        f"{', '.join(sorted(t for t, w in cfg.distill.losses.items() if w > 0))} cannot compare "
                        "them token by token; distil across tokenizers with distill.losses uld or aligned_kd")
    if cross_terms and not (student_tokenizer.is_fast and getattr(teacher_tokenizer, "is_fast", False)):
        raise UserError(f"distill.losses.{cross_terms[0]}: aligning two tokenizations needs fast tokenizers "
                        "(character offsets) on both sides")
    return student_tokenizer, bool(cross_terms)


def open_prebuilt_signal(where: str, key: dict) -> TopKCache:
    """distill.teacher_signal: the signal at `where` (path or fsspec URL), which must hold exactly this run's key."""
    signal = open_teacher_signal(where, key)
    if signal is not None:
        return signal
    found = open_teacher_signal(where)  # whatever it holds, to say what differs
    if found is None:
        raise UserError(f"distill.teacher_signal: {where} is not a complete teacher signal of format {FORMAT_VERSION} "
                        "(no readable manifest.json listing every shard; see the warning above, if any)")
    differ = "; ".join(f"{field} {found.key.get(field)!r}, this run {value!r}" for field, value in key.items()
                       if found.key.get(field) != value)
    raise UserError(f"distill.teacher_signal: {where} was built for another teacher, data or k ({differ}); "
                    "unset it to build this run's own")


def run_lm_phases(cfg: RunConfig, run_dir: Path, corpus: LMCorpus, data: LMData, teacher, tokenizer,
                  teacher_name: str, teacher_file_mb: float | None, started: float, *, resume: bool,
                  fingerprint: dict) -> Path:
    """Student, KD and no-KD training, evaluation and report of a causal-LM run, in its run dir. A resumed run
    skips the phases whose model is saved and continues the one it was in from its checkpoint. Several processes
    train together; the main process alone writes and evaluates."""
    main = is_main_process()
    blocks, student_tokenizer = data.blocks, data.student_tokenizer
    calibration = blocks["train"].batch(slice(0, 8))
    student, init_layers = make_student(cfg, teacher, calibration)
    shapes = describe_student(teacher, student)
    shapes["teacher_block_params"] = block_parameters(teacher)
    shapes["student_block_params"] = block_parameters(student)
    shapes["block_param_ratio"] = shapes["student_block_params"] / shapes["teacher_block_params"]
    baseline = copy.deepcopy(student) if cfg.distill.baseline else None  # same init: the loss is the only change
    spec = term_spec(cfg, teacher, student, init_layers)
    if "aligned_kd" in spec.active:
        spec.shared_vocab = shared_vocab(tokenizer, student_tokenizer)
        log.info("aligned_kd: %d tokens shared by the two vocabularies (teacher %d, student %d)",
                 len(spec.shared_vocab[0]), len(tokenizer), len(student_tokenizer))

    cache, cache_info = None, None
    prebuilt = cfg.distill.teacher_signal
    use_cache = cfg.distill.cache_teacher == "on" or bool(prebuilt) or (cfg.distill.cache_teacher == "auto"
                                                                         and not spec.needs_teacher_features)
    kd_terms = set(spec.active) - {"lm"}
    if use_cache and spec.needs_teacher_features:
        raise UserError(f"{'distill.teacher_signal' if prebuilt else 'distill.cache_teacher: on'} stores top-k "
                        "logits only, but the loss terms "
                        f"{sorted(set(spec.active) & {'hidden_mse', 'hidden_cosine', 'embedding_mse'})} need the "
                        "teacher's hidden states; " + ("drop them or the signal" if prebuilt else "use auto or off"))
    if use_cache and kd_terms:
        t0 = time.perf_counter()
        train = data.teacher_blocks["train"]
        if prebuilt:
            cache = open_prebuilt_signal(prebuilt, topk_key(teacher, train.input_ids, train.attention_mask,
                                                            k=cfg.distill.cache_top_k,
                                                            ends=train.ends if data.cross else None))
        else:  # every process computes its share of the shards, then all read the whole signal
            cache = build_teacher_signal(cfg, teacher, data)
        cache_info = {"k": cache.k, "path": str(cache.path), "seconds": time.perf_counter() - t0,
                      "status": "prebuilt" if prebuilt else "reused" if cache.reused else "built", "key": cache.key}

    meta = {"task": "causal-lm", "max_length": cfg.data.block_size, "strategy": cfg.distill.strategy,
            "losses": cfg.distill.losses, "teacher": teacher_name, "student_init": shapes["init"]}
    phases = {"student": (student, spec, teacher, cache, {"role": "student", **meta})}
    if baseline is not None:
        phases["baseline"] = (baseline, lm_only_spec(), None, None,
                              {**meta, "role": "no-KD baseline", "losses": {"lm": 1.0}})
    models, histories = {"teacher": teacher}, {"teacher": None}
    for name, (model, phase_spec, phase_teacher, phase_cache, phase_meta) in phases.items():
        if resume and is_saved(run_dir / name):
            log.info("%s: trained before the run was resumed (%s)", name, run_dir / name)
            models[name], histories[name] = load_model_dir(run_dir / name, task="causal-lm")[0], None
            continue
        checkpoints = phase_checkpoints(cfg, run_dir, name, resume, fingerprint)
        history = distill_causal(model, phase_teacher, blocks["train"], blocks["validation"], spec=phase_spec,
                                 distill=cfg.distill, train=cfg.train, cache=phase_cache, name=name,
                                 log_dir=run_dir / "logs", pad_id=pad_id_of(student_tokenizer),
                                 eos_id=student_tokenizer.eos_token_id, checkpoints=checkpoints)
        if main:
            save_history(run_dir, history)
            save_model(model, student_tokenizer, run_dir / name,
                       {**phase_meta, "train_wall_time_s": history.wall_time_s})
            checkpoints.clear()
        models[name], histories[name] = model, history
    if not main:  # evaluation and report: the main process alone
        return run_dir

    results = {}
    # each model reads the test pieces in its own tokens; bits per byte compares them across tokenizers
    teacher_bytes = token_byte_lengths(tokenizer)
    student_bytes = teacher_bytes if student_tokenizer is tokenizer else token_byte_lengths(student_tokenizer)
    reads = {name: (data.teacher_blocks["test"], teacher_bytes, tokenizer) if name == "teacher" else
             (blocks["test"], student_bytes, student_tokenizer) for name in models}  # blocks, byte lengths, tokenizer
    for name, model in models.items():
        results[name] = evaluate_lm_model(model, reads[name][0], cfg.eval, reads[name][1])
        results[name]["size_mb"] = dir_size_mb(run_dir / name) if name != "teacher" else \
            results[name]["params"] * 4 / 2**20
        results[name]["train_wall_time_s"] = histories[name].wall_time_s if histories[name] else \
            read_meta(run_dir / name).get("train_wall_time_s")
        if name == "teacher":
            results[name]["source_file_mb"] = teacher_file_mb
        if histories[name] and histories[name].evals:
            results[name]["validation_perplexity"] = histories[name].evals[-1]["perplexity"]
    pads = {name: pad_id_of(tok) for name, (_, _, tok) in reads.items()}
    for name, numbers in compare_lm_speed(models, {n: r[0] for n, r in reads.items()}, cfg.eval, pads).items():
        results[name].update(numbers)
    t = results["teacher"]
    for r in results.values():
        r["speedup_vs_teacher"] = r["generate_tokens_per_s"] / t["generate_tokens_per_s"]
        r["size_ratio_vs_teacher"] = t["params"] / r["params"]
        r["perplexity_ratio_vs_teacher"] = r["perplexity"] / t["perplexity"]
        r["bits_per_byte_ratio_vs_teacher"] = r["bits_per_byte"] / t["bits_per_byte"]

    metrics = {
        "run": cfg.name,
        "task": "causal-lm",
        "strategy": cfg.distill.strategy,
        "teacher": teacher_name,
        "data": {**corpus.summary(), "block_size": cfg.data.block_size,
                 "blocks": {s: len(b) for s, b in blocks.items()}, "tokens": {s: b.tokens for s, b in blocks.items()}},
        "student_shape": shapes,
        "models": results,
        "samples": {**sample_generations({"teacher": teacher}, tokenizer, threads=cfg.eval.num_threads),
                    **sample_generations({n: m for n, m in models.items() if n != "teacher"}, student_tokenizer,
                                         threads=cfg.eval.num_threads)},
        "cross_tokenizer": cross_tokenizer_info(data, spec, cache) if data.cross else None,
        "teacher_cache": cache_info,
        "machine": {**machine_info(), "host": socket.gethostname(),
                    "eval_threads": cfg.eval.num_threads or torch.get_num_threads(),
                    "world_size": world_size()},
        "units": {"perplexity": "exp(nats/token)", "nll_per_token": "nats",
                  "bits_per_byte": "bits per UTF-8 byte of the predicted test tokens",
                  "generate_tokens_per_s": "tokens/s",
                  "score_tokens_per_s": "tokens/s", "ms_per_token_batch1": "ms", "size_mb": "MiB",
                  "train_wall_time_s": "s"},
        "total_wall_time_s": time.perf_counter() - started,
    }
    atomic_write_json(run_dir / "metrics.json", metrics)
    write_report([run_dir])
    log.info("causal-lm run done in %.0f s: %s", metrics["total_wall_time_s"],
             json.dumps({n: round(r["perplexity"], 2) for n, r in results.items()}))
    return run_dir


def cross_tokenizer_info(data: LMData, spec: TermSpec, signal: TopKCache) -> dict:
    """What a cross-tokenizer run aligned: the share of the student's training targets with a teacher position
    ending at the same byte, and the size of the shared vocabulary (aligned_kd)."""
    train = data.blocks["train"]
    batch = with_alignment(with_targets({**train.batch(slice(None)), "ends": train.ends,
                                         "teacher_ends": signal.ends(range(len(signal)))}))
    aligned, targets = batch["aligned"].shape[1], int(batch["valid"].sum())
    return {"terms": sorted(set(spec.active) & CROSS_TOKENIZER_TERMS), "aligned_targets": aligned,
            "targets": targets, "aligned_fraction": aligned / max(1, targets),
            "shared_vocab": len(spec.shared_vocab[0]) if spec.shared_vocab is not None else None,
            "teacher_block_tokens": data.teacher_blocks["train"].input_ids.shape[1]}


def teacher_run(cfg: RunConfig, out: str | Path | None = None, *, overwrite: bool = False) -> tuple[Path, Path]:
    """`kdistill train-teacher`: train (or take teacher.path) and evaluate the teacher alone; (run dir, teacher
    dir)."""
    run_dir = run_dir_of(cfg, out)
    preflight(cfg, run_dir, overwrite=overwrite, distilling=False)
    data = load_task_data(cfg)
    fp = run_fingerprint(cfg, training_data(data))
    with run_dir_for(cfg, run_dir, fp, overwrite=overwrite), writing(run_dir):
        encodings = Encodings(cfg.data.max_length, cfg.data.label_all_subtokens)
        _, _, teacher_dir, history = get_teacher(cfg, data, encodings, run_dir, fingerprint=fp)
        standalone_metrics(cfg, run_dir, {"teacher": (teacher_dir, history)}, data, encodings)
    return run_dir, teacher_dir


def standalone_metrics(cfg: RunConfig, run_dir: Path, models: dict, data: DataBundle, encodings: Encodings) -> dict:
    """Evaluate the given models (e.g. just the teacher) and write metrics.json + report (main process)."""
    if not is_main_process():
        return {}
    metrics = evaluate_run(cfg, run_dir, models, data, None, encodings)
    atomic_write_json(run_dir / "metrics.json", metrics)
    write_report([run_dir])
    return metrics


def data_config_for(spec: str, overrides: list[str]) -> DataConfig:
    """`--data SPEC`: a built-in dataset name or a data file, plus `--set data.x=y` overrides."""
    builtin = spec in BUILTIN_DATASETS or spec in TOKEN_DATASETS
    raw = {"data": {"dataset": spec} if builtin else {"train_file": spec, "dataset": None}}
    for item in overrides:
        keys, value = parse_override(item)
        if keys[0] != "data" or len(keys) != 2:
            raise UserError(f"--set {item}: only data.* keys apply here")
        raw["data"][keys[1]] = value
    return validate_config(raw, "--data").data


def data_for_model(model_dir: str | Path, spec: str, overrides: list[str]) -> DataBundle:
    """Data whose label ids are those of the model's config (the same names, in the model's order)."""
    model_dir = Path(model_dir)
    info = inspect_model_dir(model_dir)
    names = info.labels
    if info.task == "token-classification":  # sentences with tags; the model's tag order
        return token_data_for_model(model_dir, names, load_token_data(data_config_for(spec, overrides)), spec)
    data = load_data(data_config_for(spec, overrides))
    if sorted(names) != sorted(data.label_names):
        raise UserError(f"{model_dir}: model labels {names} differ from the data's {data.label_names} ({spec})")
    if names != data.label_names:  # same names, other order: renumber the data to the model's ids
        remap = {i: names.index(n) for i, n in enumerate(data.label_names)}
        data.splits = data.splits.map(lambda r: {"label": remap.get(r["label"], r["label"])})  # UNLABELED stays
        data.label_names = names
    return data


def evaluate_dir(model_dir: str | Path, spec: str, *, split: str = "test", overrides: list[str] | None = None,
                 out: str | Path | None = None, teacher: str | Path | None = None) -> dict:
    """`kdistill evaluate`: every number of one model dir on one split of a dataset. A sentence encoder (task
    embedding) gets k-NN accuracy (the train split as the index) and, with `teacher` (a sentence-transformers dir),
    its agreement with that teacher on the split; `teacher` is refused for the other tasks."""
    if split not in ("test", "validation", "train", "all"):
        raise UserError(f"--split: {split!r} is not one of test, validation, train, all")
    info = inspect_model_dir(model_dir)
    if teacher is not None and info.task != "embedding":
        raise UserError(f"--teacher: only sentence encoders (task embedding) are compared with a teacher; "
                        f"{model_dir} is a {info.task} model")
    if info.task == "embedding":
        data = load_data(data_config_for(spec, overrides or []))
    else:
        data = data_for_model(model_dir, spec, overrides or [])
    if split != "test":
        chosen = concatenate_datasets(list(data.splits.values())) if split == "all" else data.splits[split]
        data.splits["test"] = chosen
    if info.task == "embedding":
        models = {"model": (Path(model_dir), None), **({"teacher": (Path(teacher), None)} if teacher else {})}
        max_length = info.meta.get("max_length") or 512
        metrics = embedding_results(models, data, Encodings(max_length), EvalConfig(),
                                    knn=split in ("test", "validation"))["model"]
    else:
        model, tokenizer, meta = load_model_dir(model_dir)
        max_length = meta.get("max_length") or min(tokenizer.model_max_length, 512)
        encoded = tokenize_splits(data, tokenizer, max_length, ("test",))["test"]
        metrics = evaluate_model(model, tokenizer, encoded, data.label_names, EvalConfig(), model_dir)
    metrics.update({"model": str(model_dir), "task": info.task, "data": spec, "split": split,
                    "machine": machine_info(), "train_wall_time_s": info.meta.get("train_wall_time_s")})
    atomic_write_json(Path(out) if out else Path(model_dir) / "metrics.json", metrics)
    return metrics


# ------------------------------------------------------------------------------------ sentence embeddings
# task: embedding (Reimers & Gurevych 2020): a frozen sentence-transformers teacher; the student (layers of the
# teacher's transformer, or student.model) with the teacher's pooling learns the teacher's pooled embeddings on the
# run's texts (labels unused) through distill/explicit.py; the teacher is given, never trained. The no-KD control is
# the same student untrained: its initialisation, saved as "baseline".

def embedding_teacher_dir(cfg: RunConfig) -> Path:
    """The teacher sentence encoder's dir: teacher.path, or teacher.model (built-in alias or local dir)."""
    if cfg.teacher.from_scratch is not None and not cfg.teacher.path:
        raise UserError("teacher.from_scratch: task embedding distils a given sentence encoder; set teacher.model "
                        "(minilm-l6, mpnet-base or a sentence-transformers dir)")
    name = cfg.teacher.path or cfg.teacher.model
    if not name:
        raise UserError("teacher.model: task embedding needs a sentence-transformers teacher (minilm-l6, mpnet-base "
                        "or a dir)")
    source, extra = resolve_model_source(name)
    if extra or not Path(source).is_dir():
        raise UserError(f"teacher.model: {name}: task embedding needs a local sentence-transformers dir")
    return Path(source)


def check_embedding(cfg: RunConfig) -> None:
    """What an embedding run supports, checked before any data is read: a sentence-transformers teacher kdistill can
    pool, the explicit strategy."""
    read_pooling(embedding_teacher_dir(cfg))
    if cfg.distill.strategy != "explicit":
        raise UserError(f"distill.strategy: task embedding supports explicit (a frozen teacher), not "
                        f"{cfg.distill.strategy}")


def run_embedding_phases(cfg: RunConfig, data: DataBundle, run_dir: Path, *, resume: bool, started: float,
                         fingerprint: dict) -> Path:
    """Baseline (the student's initialisation), student (distilled), then evaluation and report (main process)."""
    main = is_main_process()
    encodings = Encodings(cfg.data.max_length)
    teacher_dir = embedding_teacher_dir(cfg)
    pooling = read_pooling(teacher_dir)
    teacher, tokenizer, _ = load_model_dir(teacher_dir, task="embedding")
    student_tokenizer, cross, calibration = student_reads(cfg, data, encodings, tokenizer)
    student, init_layers = make_student(cfg, teacher, calibration)
    shapes = describe_student(teacher, student)

    def save(model, name: str, meta: dict) -> None:
        save_sentence_encoder(model, student_tokenizer, run_dir / name, {"max_length": cfg.data.max_length,
                              "student_init": shapes["init"], **meta}, pooling, cfg.data.max_length)

    models = {"teacher": (teacher_dir, None), "student": (run_dir / "student", None)}
    if cfg.distill.baseline:  # the no-KD control: the same student, not trained at all
        if main and not (resume and is_saved(run_dir / "baseline")):
            save(student, "baseline", {"role": "no-KD baseline: the student's initialisation, untrained",
                                       "train_wall_time_s": 0.0})
        models["baseline"] = (run_dir / "baseline", None)
    if resume and is_saved(run_dir / "student"):
        log.info("student: distilled before the run was resumed (%s)", run_dir / "student")
    else:
        checkpoints = phase_checkpoints(cfg, run_dir, "student", resume, fingerprint)
        student_data = with_transfer(data, cfg.data, teacher, tokenizer)  # data.unlabeled_file: more texts to learn
        teacher_train = encodings(student_data, tokenizer, ("train",))["train"] if cross else None
        history, _ = distill_student(cfg, teacher, student_tokenizer, encodings(student_data, student_tokenizer),
                                     run_dir, init_layers, student, checkpoints,
                                     teacher_tokenizer=tokenizer if cross else None, teacher_train=teacher_train,
                                     pooling=pooling)
        models["student"] = (run_dir / "student", history)
        if main:
            save_history(run_dir, history)
            save(student, "student", {"role": "student", "strategy": cfg.distill.strategy,
                                      "losses": cfg.distill.losses, "train_wall_time_s": history.wall_time_s})
            checkpoints.clear()
    if not main:
        return run_dir
    metrics = evaluate_embedding_run(cfg, models, data, shapes, encodings)
    return finish_run(cfg, run_dir, data, metrics, started)


def evaluate_embedding_run(cfg: RunConfig, models: dict, data: DataBundle, shapes: dict | None,
                           encodings: Encodings) -> dict:
    """Every sentence encoder of the run on the same held-out texts (the test split): `embedding_results`, and
    each one's speed-up, size ratio and k-NN accuracy relative to the teacher."""
    results = embedding_results(models, data, encodings, cfg.eval)
    t = results["teacher"]
    for r in results.values():
        r["speedup_vs_teacher"] = t["latency_ms_batch1"] / r["latency_ms_batch1"]
        r["size_ratio_vs_teacher"] = t["params"] / r["params"]
        if "knn_accuracy" in r:
            r["knn_accuracy_delta_vs_teacher_points"] = 100 * (r["knn_accuracy"] - t["knn_accuracy"])
    return run_metrics(cfg, data, shapes, results, spearman_agreement="Spearman rho", recall_at_10="fraction",
                       knn_accuracy="fraction", knn_accuracy_delta_vs_teacher_points="percentage points")


def embedding_results(models: dict, data: DataBundle, encodings: Encodings, eval_cfg: EvalConfig, *,
                      knn: bool = True) -> dict:
    """name -> numbers of each sentence encoder in `models` (name -> (dir, history or None)) on the test split,
    each in its own tokenization: agreement with models["teacher"] where there is one (Spearman ρ of pairwise
    cosines, recall@10 of its neighbours), k-NN accuracy (train split as the index, test split as queries) where
    `knn` and the data has labels, size, and speed measured interleaved."""
    labeled = knn and bool(data.label_names) and all(
        y != UNLABELED for split in ("train", "test") for y in data.splits[split]["label"])
    splits = ("train", "test") if labeled else ("test",)
    loaded, inputs, vectors = {}, {}, {}
    for name, (path, _) in models.items():
        model, tokenizer, _ = load_model_dir(path, task="embedding")
        encoded = encodings(data, tokenizer, splits)
        loaded[name], inputs[name] = model, (encoded["test"], tokenizer)
        vectors[name] = {split: embed(model, encoded[split], tokenizer, read_pooling(path)) for split in splits}
    results = {}
    for name, (path, history) in models.items():
        v = vectors[name]
        knn_data = (v["train"], data.splits["train"]["label"], v["test"], data.splits["test"]["label"]) \
            if labeled else None
        teacher_test = vectors["teacher"]["test"] if "teacher" in vectors else None
        results[name] = {**embedding_metrics(v["test"], teacher_test, knn=knn_data),
                         "params": count_parameters(loaded[name]), "size_mb": dir_size_mb(path),
                         "train_wall_time_s": history.wall_time_s if history else
                         read_meta(path).get("train_wall_time_s")}
    for name, numbers in compare_speed(loaded, inputs, eval_cfg).items():
        results[name].update(numbers)
    return results


