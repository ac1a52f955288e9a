"""The student of a run: its shape and layers, the model it is cut from, its tokenizer, and the loss terms between
it and its teacher (`term_spec`)."""

from __future__ import annotations

import logging

from transformers import AutoConfig

from kdistill.config import STUDENT_SHAPE_KEYS, RunConfig, StudentConfig
from kdistill.data import DataBundle, Encodings
from kdistill.strategies.explicit import why_not_cached
from kdistill.errors import UserError
from kdistill.models import load_classifier, load_tokenizer, resolve_model_source, seeded
from kdistill.student import build_student, check_layers, num_layers_of, select_layers
from kdistill.task import get_task
from kdistill.terms import TERMS, TermSpec, layer_pairs

log = logging.getLogger(__name__)


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

def is_shaped(student_cfg) -> bool:
    """Whether the recipe sets a student shape key: then a student.model is pruned by them, else taken whole."""
    return any(getattr(student_cfg, key) is not None for key in STUDENT_SHAPE_KEYS)

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

def check_relation_heads(spec: TermSpec, student_width: int, teacher_width: int) -> None:
    widths = {student_width, teacher_width}
    heads = spec.option("relation_heads")
    if spec.needs_qkv and any(w % heads for w in widths):
        raise UserError(f"distill.relation_heads: {heads} must divide both widths "
                        f"{sorted(widths)} for the minilm_* terms")

def student_reads(cfg: RunConfig, data: DataBundle, encodings: Encodings, tokenizer):
    """(the student's tokenizer, whether it differs from the teacher's `tokenizer`, the calibration batch of a
    student pruned from the teacher or a classification student.model, else None): a given student.model reads its
    own tokenizer, maybe another."""
    if cfg.student.model:
        student_tokenizer = load_tokenizer(cfg.student.model)
        cross = check_tokenizers(cfg, tokenizer, student_tokenizer)
        if not get_task(cfg.task).has("prune_student_model") or not is_shaped(cfg.student):
            return student_tokenizer, cross, None
        return student_tokenizer, cross, calibration_batch(
            encodings(data, student_tokenizer, ("train",))["train"], student_tokenizer)
    return tokenizer, False, calibration_batch(encodings(data, tokenizer, ("train",))["train"], tokenizer)

def student_classifier(cfg: RunConfig, labels: list[str]):
    """student.model with a classification head for `labels` (a new one, unless it was trained on exactly these
    labels already)."""
    given = AutoConfig.from_pretrained(resolve_model_source(cfg.student.model)[0], trust_remote_code=False)
    trained = any(a.endswith("ForSequenceClassification") for a in given.architectures or [])
    names = [given.id2label[i] for i in range(given.num_labels)]
    if trained and names != labels:
        raise UserError(f"student.model: {cfg.student.model} was trained on labels {names}, the data has {labels}; "
                        "give an encoder without a classification head (it gets one for the data's labels)")
    with seeded(cfg.train.seed):  # a head new to the encoder
        return load_classifier(cfg.student.model, labels, task=cfg.task)

def make_student(cfg: RunConfig, teacher, calibration: dict | None):
    """The student the recipe describes, and the teacher layers it was copied from. A given student.model is
    loaded by the task (`Task.student_model`: a classifier gets a head for the teacher's labels); where the task
    prunes it ("prune_student_model") and the recipe sets student.layers (or a width), it is cut like a teacher
    (`calibration`: its own tokens), e.g. 2 layers of a general-purpose pretrained encoder that never saw the
    task; else it is taken whole."""
    s = cfg.student
    task = get_task(cfg.task)
    source = teacher
    if s.model:
        source = task.student_model(cfg, teacher)
        if not task.has("prune_student_model"):
            return source.train(), None
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

def term_spec(cfg: RunConfig, teacher, student, init_layers) -> TermSpec:
    try:
        pairs = layer_pairs(cfg.distill.layer_mapping, student_layers=num_layers_of(student.config),
                            teacher_layers=num_layers_of(teacher.config), init_layers=init_layers)
    except ValueError as e:
        raise UserError(str(e)) from None
    spec = TermSpec.of_recipe(cfg.distill.losses, pairs, cfg.distill)
    check_relation_heads(spec, student.config.hidden_size, teacher.config.hidden_size)
    with seeded(cfg.train.seed):  # the projections start the same in every run and every process
        spec.add_projections(student.config.hidden_size, teacher.config.hidden_size)
    return spec
