"""Peer trl: TRL's GKDTrainer (worker_trl.py) beside kdistill's instruction distillation, on the same work: kdistill's
run of the instruct recipe with one tokenizer (a student cut from the teacher), its chat rows (the gold rows and the
teacher's stored responses to the transfer prompts), the student it starts from (saved before any training), its
teacher, steps, batch, lr, schedule and max lengths; GKD's beta and lmbda from kdistill's loss and
distill.on_policy_fraction.

Also the harness's side of the instruction table (run.py calls it where the task is instruction):
  counting      while kdistill's run trains in the harness's process, the response tokens every step learns
  prepare       kdistill's training rows rebuilt by kdistill's own functions and checked against the run's data
                fingerprint (kdistill-run.json), exported for TRL (data/train.jsonl in TRL's conversational format,
                data/test.jsonl, data/data.json), and the teacher and the untrained student saved as HF dirs
  score_model   a model dir's greedy responses to the test prompts by kdistill's own generation (tasks.instruction
                .answer) and scorer, the path kdistill's run scored its own models by
A step "learns" its target tokens: the response tokens the loss is summed over (generated ones on an on-policy step).
Throughput = tokens learned / train wall time; kdistill's wall time less its validation passes and checkpoints (TRL
here validates and saves none).
"""

from __future__ import annotations

import gc
import json
import time
from contextlib import contextmanager
from pathlib import Path

from benchmarks.peers.common import Peer, PeerFailed, Setup, disk_mb, write_jsonl

PACKAGES = ("trl==1.16.0", "transformers==5.25.0", "accelerate==1.16.0", "datasets==5.2.0")
RECIPE = "instruct"
SAME_TOKENIZER = ["teacher.model=smollm2-135m", "student.model=null", "student.layers=12", "distill.losses={jsd: 1.0}",
                  "distill.temperature=1.0", "distill.on_policy_fraction=0.5", "distill.baseline=false",
                  "train.grad_accum=4", "train.eval_every=100000"]
"""The instruct recipe as the table runs it: the bundled SmolLM2-135M-Instruct as the teacher and a student of 12 of
its 30 layers (one tokenizer, which GKD needs; with the recipe's Qwen2.5-0.5B, whose 152k-token vocabulary dominates
every step, each system's 90 steps take hours on 2 cores), GKD's own setting (generalized JSD with beta 0.5, half the
batches on-policy), at T = 1 (GKDTrainer's loss takes no temperature), no no-KD baseline (TRL has none to set beside
it), each step's 8 rows in 4 micro-batches of 2 (the same loss and gradients in both: each normalises over the whole
step; full-vocabulary log-probs of 8 rows at once took TRL's worker past 16 GB), one validation, at the end (without
early stopping it only logs; each pass over the 100 validation rows costs minutes on a CPU)."""
QUICK = ["student.layers=2", "data.limit=8", "data.held_out_limit=8", "data.labeled_limit=4", "train.max_steps=2",
         "eval.samples=2"]
"""--quick: 2 of the teacher's layers as the student, 8 prompts per split (4 gold rows, 4 the teacher answers), 2
steps of 8 rows."""
TOKENS_FILE = "kdistill-tokens.json"
"""Beside kdistill's run dir: what `counting` counted while it trained (a run reused without it is run again)."""
PHASE = "train student"
"""The engine's name of the distilled student's phase (Engine.desc)."""
DIVERGENCES = {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": None}
"""kdistill's token-level terms that are GKD's generalized JSD, and its beta (jsd: distill.gjsd_beta)."""


# ------------------------------------------------------------------------------------------- kdistill's count

@contextmanager
def counting(out: Path):
    """Count, per training phase, the target tokens of every optimizer step and the seconds spent validating and
    writing checkpoints, while kdistill trains in this process; written to `out` (JSON: {phase: {"targets", "steps",
    "batches", "validation_s", "checkpoint_s"}}) when the block ends without an error.

    Every step's loss is normalised by `engine.step_units` over the step's micro-batches (generated ones included),
    whose "targets" are the next-token targets the terms sum over; `Engine.run` names the phase; `validate_all` and
    `Checkpoints.save` (at every epoch end) run inside its timed loop. kdistill's history records none of these, so
    the harness wraps the four for the length of the run, and puts them back after it."""
    import kdistill.engine as engine
    from kdistill.checkpoint import Checkpoints

    counts: dict[str, dict] = {}
    phase = [None]
    originals = engine.step_units, engine.Engine.run, engine.Engine.validate_all, Checkpoints.save
    step_units, run, validate_all, save = originals

    def counter() -> dict:
        return counts.setdefault(phase[0], {"targets": 0, "steps": 0, "batches": 0, "validation_s": 0.0,
                                            "checkpoint_s": 0.0})

    def counted_units(group, accelerator):
        units = step_units(group, accelerator)
        c = counter()
        c["targets"] += int(units.get("targets", 0))
        c["steps"] += 1
        c["batches"] += len(group)
        return units

    def named_run(self, take_step):
        phase[0] = self.desc
        return run(self, take_step)

    def timed(method, key: str):
        def call(self, *args, **kwargs):
            started = time.perf_counter()
            try:
                return method(self, *args, **kwargs)
            finally:
                counter()[key] += time.perf_counter() - started
        return call

    engine.step_units, engine.Engine.run = counted_units, named_run
    engine.Engine.validate_all, Checkpoints.save = timed(validate_all, "validation_s"), timed(save, "checkpoint_s")
    try:
        yield counts
    finally:
        engine.step_units, engine.Engine.run, engine.Engine.validate_all, Checkpoints.save = originals
    out.write_text(json.dumps(counts, indent=2) + "\n", encoding="utf-8")


def has_counts(path: Path) -> bool:
    """Whether `path` holds `counting`'s counts of a distilled student (else its run is made again)."""
    try:
        counted = json.loads(path.read_text(encoding="utf-8"))[PHASE]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return {"targets", "steps", "batches", "validation_s", "checkpoint_s"} <= set(counted)


# ------------------------------------------------------------------------------------------------- the rows

def check_rows(cfg, data, examples: list, responses: list[str], run_dir: Path) -> None:
    """UserError unless `examples` and `responses` are the training data of the run in `run_dir`: the data half of
    its fingerprint (kdistill-run.json) hashes exactly these rows and the validation prompts."""
    from kdistill.errors import UserError
    from kdistill.rundir import MANIFEST, run_fingerprint

    now = run_fingerprint(cfg, {"train": [json.dumps([e.prompt, r]) for e, r in zip(examples, responses)],
                                "validation": [json.dumps(e.prompt) for e in data.splits["validation"]]})
    saved = json.loads((run_dir / MANIFEST).read_text(encoding="utf-8"))["fingerprint"]
    if now["data"] != saved["data"]:
        raise UserError(f"{run_dir / MANIFEST}: the training rows rebuilt here are not the ones the run trained on "
                        "(kdistill.tasks.instruction builds them another way now?); remove the run dir")


def export_rows(out: Path, data, examples: list, responses: list[str]) -> Path:
    """Write what the TRL worker reads: train.jsonl, one {"messages": [prompt turns..., {"role": "assistant",
    "content": response}]} per training row in kdistill's order (TRL's conversational format: each model renders
    it with its own chat template); test.jsonl, the test prompts {"messages": [prompt turns...], **the row's fields
    (e.g. answer)}; data.json, the sizes."""
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "train.jsonl", [{"messages": [*e.prompt, {"role": "assistant", "content": r}]}
                                      for e, r in zip(examples, responses)])
    write_jsonl(out / "test.jsonl", [{"messages": list(e.prompt), **e.fields} for e in data.splits["test"]])
    summary = {**data.summary(), "train_rows": len(examples), "answered_by_teacher": len(examples) - len(data.gold)}
    (out / "data.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return out


# ----------------------------------------------------------------------------------------------- the setup

def prepare(recipe: str, cfg, run_dir: Path, work: Path, *, quick: bool, threads: int) -> Setup:
    """The instruction table's Setup from kdistill's finished run of `cfg` in `run_dir`: its data (InstructionData),
    the rows exported (`export_rows`, checked by `check_rows`), its teacher and the untrained student saved as HF
    dirs under work/models (teacher_dir, student_dir: what TRL loads; kept while the run's fingerprint is the one
    they were saved for), and the teacher's answers to the test prompts as the scorer reads them (teacher_test, for
    agreement). The student is made again by kdistill's make_student, which is deterministic (its layers are checked
    against the run's)."""
    from kdistill.cache.keys import fingerprint_model
    from kdistill.data.instructions import load_instruction_data
    from kdistill.errors import UserError
    from kdistill.measure import torch_threads
    from kdistill.models import save_model
    from kdistill.pipeline.students import make_student
    from kdistill.rundir import MANIFEST
    from kdistill.scorers import score
    from kdistill.tasks.instruction import Reader, answer, student_reader, training_rows
    from kdistill.teacher import load_causal_teacher

    if cfg.teacher.endpoint is not None:
        raise UserError(f"teacher.endpoint: {cfg.teacher.endpoint.url}; the instruction table's peers learn the "
                        "teacher's next-token distributions, so they need its weights: set teacher.model")
    data = load_instruction_data(cfg.data)
    models = work / "models"
    teacher_dir, student_dir = models / "teacher", models / "student-init"
    init = json.loads((run_dir / "student" / "kdistill.json").read_text(encoding="utf-8"))["student_init"] or {}
    with torch_threads(threads):
        teacher, tokenizer, _, _ = load_causal_teacher(cfg)
        teacher_reader = Reader.of(tokenizer)
        reader = student_reader(cfg, teacher_reader)
        examples, responses, _ = training_rows(cfg, data, teacher, teacher_reader)
        check_rows(cfg, data, examples, responses, run_dir)
        data_dir = export_rows(work / "data", data, examples, responses)
        texts, _, _ = answer("teacher", teacher, teacher_reader, data, cfg)
        teacher_test = score(scorer_of(cfg, data), texts, [e.fields for e in data.splits["test"]])
        stamp = {"run": json.loads((run_dir / MANIFEST).read_text(encoding="utf-8"))["fingerprint"],
                 "teacher": fingerprint_model(teacher)}
        if not saved_for(models, stamp):
            blocks = reader.blocks(examples, responses, cfg.data, "train")
            calibration = {k: v for k, v in blocks.batch(slice(0, 8)).items() if k != "prompt_length"}
            student, _ = make_student(cfg, teacher, calibration)
            made = getattr(student, "kdistill_init", None) or {}
            if made.get("teacher_layers") != init.get("teacher_layers"):
                raise UserError(f"{run_dir / 'student'}: the run's student copied teacher layers "
                                f"{init.get('teacher_layers')}, make_student gives {made.get('teacher_layers')} now")
            meta = {"task": cfg.task, "max_length": cfg.data.max_prompt_tokens + cfg.data.max_response_tokens}
            save_model(teacher, tokenizer, teacher_dir, {**meta, "role": "teacher", "source": cfg.teacher.model})
            save_model(student, reader.tokenizer, student_dir, {**meta, "role": "untrained student",
                                                                 "student_init": made})
            (models / "export.json").write_text(json.dumps(stamp, indent=2) + "\n", encoding="utf-8")
            del student
    del teacher
    gc.collect()  # (the worker loads its own copy: this process holds none while it trains)
    return Setup(recipe=recipe, cfg=cfg, data=data, data_dir=data_dir, run_dir=run_dir, work=work,
                 teacher_dir=teacher_dir, base_dir=teacher_dir, student_dir=student_dir,
                 student_layers=list(init.get("teacher_layers") or []), quick=quick, threads=threads,
                 teacher_test=teacher_test["extracted"])


def saved_for(models: Path, stamp: dict) -> bool:
    """Whether work/models holds the teacher and untrained student saved for `stamp` (the run's fingerprint and the
    teacher's weights)."""
    try:
        saved = json.loads((models / "export.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return saved == stamp and all((models / d / "model.safetensors").is_file() for d in ("teacher", "student-init"))


def scorer_of(cfg, data):
    """The run's scorer, as run_instruction makes it."""
    from kdistill.scorers import get_scorer

    return get_scorer(cfg.eval.scorer or data.scorer, **{**data.scorer_options, **cfg.eval.scorer_options})


# ------------------------------------------------------------------------------------------------- scoring

def score_model(setup: Setup, model_dir: Path) -> dict:
    """A causal LM dir's numbers on the test prompts, by the code that scored kdistill's own models
    (evaluate_instruction_run): its greedy responses of at most data.max_response_tokens (tasks.instruction.answer,
    its own tokenizer's chat template), the run's scorer, agreement with the teacher's answers (setup.teacher_test),
    mean response tokens, empty responses, generation speed and parameters."""
    from kdistill.measure import torch_threads
    from kdistill.models import load_causal_lm, load_tokenizer
    from kdistill.scorers import agreement, score
    from kdistill.tasks.instruction import Reader, answer

    cfg, data = setup.cfg, setup.data
    tokenizer = load_tokenizer(str(model_dir))
    if tokenizer.pad_token_id is None:  # (as load_causal_teacher does)
        tokenizer.pad_token = tokenizer.eos_token
    reader = Reader.of(tokenizer)
    model = load_causal_lm(str(model_dir)).eval()
    with torch_threads(setup.threads):
        texts, tokens, speed = answer("student", model, reader, data, cfg)
    scored = score(scorer_of(cfg, data), texts, [e.fields for e in data.splits["test"]])
    return {"task_score": scored["mean"], "agreement_with_teacher": agreement(scored["extracted"], setup.teacher_test),
            "response_tokens": sum(tokens) / max(1, len(tokens)), "empty_responses": sum(not t for t in texts),
            "params": sum(p.numel() for p in model.parameters()), **speed}


# ----------------------------------------------------------------------------------------------- kdistill's rows

SCORE_KEYS = ("task_score", "agreement_with_teacher", "response_tokens", "empty_responses", "params",
              "generate_tokens_per_s")


def kdistill_systems(setup: Setup, roles: set[str]) -> dict[str, tuple[dict, Path]]:
    """kdistill's rows (teacher, untrained student, distilled student) from its run's metrics.json, which the same
    score_model path wrote; the student's tokens learned from `counting`'s file, its on-policy steps from its
    history. Sizes: the dirs TRL loads (teacher, untrained student) and the run's student dir."""
    metrics = json.loads((setup.run_dir / "metrics.json").read_text(encoding="utf-8"))
    shape = metrics.get("student_shape") or {}
    layers = (shape.get("student") or {}).get("layers"), (shape.get("teacher") or {}).get("layers")
    labels = {"teacher": f"teacher ({setup.cfg.teacher.model}, fp32)",
              "untrained": f"student before training ({layers[0]} of the teacher's {layers[1]} layers)",
              "student": f"kdistill student ({loss_line(setup.cfg.distill)})"}
    dirs = {"teacher": setup.teacher_dir, "untrained": setup.student_dir, "student": setup.run_dir / "student"}
    out = {}
    for role in sorted(roles):
        m = metrics["models"][role]
        numbers = {"label": labels[role], **{k: m[k] for k in SCORE_KEYS if k in m}, "size_mb": disk_mb(dirs[role])}
        if role == "student":
            numbers.update(learned(setup, m))
        out[f"kdistill:{role}"] = (numbers, dirs[role])
    return out


def learned(setup: Setup, student: dict) -> dict:
    """The distilled student's training numbers: steps, micro-batches and the on-policy ones (every micro-batch of an
    on-policy step), target tokens, train wall time, the parts of it spent validating and writing checkpoints, and
    tokens learned per second of the rest."""
    counted = json.loads((setup.work / TOKENS_FILE).read_text(encoding="utf-8"))[PHASE]
    history = json.loads((setup.run_dir / "logs" / "history_student.json").read_text(encoding="utf-8"))
    on_policy = sum(bool(s.get("on_policy")) for s in history["steps"])
    wall, aside = student["train_wall_time_s"], counted["validation_s"] + counted["checkpoint_s"]
    return {"train_wall_time_s": wall, "validation_s": counted["validation_s"],
            "checkpoint_s": counted["checkpoint_s"], "steps": student["training"]["steps_run"],
            "examples": counted["steps"] * setup.cfg.train.batch_size,
            "batches": counted["batches"], "on_policy_batches": on_policy * setup.cfg.train.grad_accum,
            "targets": counted["targets"], "tokens_per_s": counted["targets"] / (wall - aside)}


def loss_line(d) -> str:
    terms = ", ".join(f"{t} {w:g}" for t, w in d.losses.items() if w)
    return f"{terms}, T = {d.temperature:g}" + (f", on-policy fraction {d.on_policy_fraction:g}"
                                                  if d.on_policy_fraction else "")


# --------------------------------------------------------------------------------------------------- the peer

def gkd_settings(setup: Setup) -> dict:
    """GKD's beta and lmbda for kdistill's recipe; PeerFailed, naming the key, where GKDTrainer cannot do the same."""
    cfg = setup.cfg
    d = cfg.distill
    active = {term: w for term, w in d.losses.items() if w}
    if cfg.teacher.endpoint is not None:
        raise PeerFailed("teacher.endpoint: GKDTrainer needs the teacher's weights (its next-token distributions)")
    if cfg.student.model:
        raise PeerFailed(f"student.model: {cfg.student.model}; GKDTrainer needs the teacher's tokenizer (set "
                         "student.model=null: a student cut from the teacher)")
    if len(active) != 1 or next(iter(active)) not in DIVERGENCES or next(iter(active.values())) != 1.0:
        raise PeerFailed(f"distill.losses: {json.dumps(active)}; GKDTrainer's loss is one generalized JSD: "
                         f"{{forward_kl: 1.0}}, {{reverse_kl: 1.0}} or {{jsd: 1.0}}")
    if d.temperature != 1.0 or d.temperature_end not in (None, 1.0):
        raise PeerFailed(f"distill.temperature: {d.temperature:g}; GKDTrainer's loss is at T = 1 (its temperature "
                         "only samples), set distill.temperature=1.0")
    if cfg.train.mixed_precision != "no":
        raise PeerFailed(f"train.mixed_precision: {cfg.train.mixed_precision}; this comparison runs fp32")
    term = next(iter(active))
    return {"beta": d.gjsd_beta if term == "jsd" else DIVERGENCES[term], "lmbda": d.on_policy_fraction}


def budget(setup: Setup) -> dict:
    """The distilled student's budget in kdistill's run (every system's), with GKD's settings where they apply."""
    train, d, data = setup.cfg.train, setup.cfg.distill, setup.cfg.data
    metrics = json.loads((setup.run_dir / "metrics.json").read_text(encoding="utf-8"))
    training = metrics["models"]["student"]["training"]
    return {"steps": training["steps_run"], "planned_steps": training["planned_steps"],
            "batch_size": train.batch_size, "grad_accum": train.grad_accum, "lr": train.lr,
            "warmup_ratio": train.warmup_ratio, "warmup_steps": int(train.warmup_ratio * training["planned_steps"]),
            "weight_decay": train.weight_decay, "max_grad_norm": train.max_grad_norm, "seed": train.seed,
            "max_prompt_tokens": data.max_prompt_tokens, "max_response_tokens": data.max_response_tokens,
            "temperature": d.temperature, "losses": dict(d.losses), "gjsd_beta": d.gjsd_beta,
            "on_policy_fraction": d.on_policy_fraction}


def job(setup: Setup) -> dict:
    """The train job: the saved teacher and untrained student, the exported rows, the budget and GKD's settings, and
    the ids a response stops at (the chat template's end of turn and EOS, where kdistill's generation stops)."""
    from kdistill.models import load_tokenizer
    from kdistill.tasks.instruction import Reader

    gkd = gkd_settings(setup)
    stop_ids = sorted(Reader.of(load_tokenizer(str(setup.student_dir))).stop_ids)
    return {"teacher": str(setup.teacher_dir), "student": str(setup.student_dir), "data": str(setup.data_dir),
            "budget": {**budget(setup), **gkd}, "stop_ids": stop_ids}


def systems(setup: Setup, out: Path, result: dict) -> dict:
    gkd = gkd_settings(setup)
    counted = ("train_wall_time_s", "steps", "examples", "batches", "on_policy_batches", "targets", "tokens_per_s",
               "peak_rss_mb", "loss_divisor", "versions")
    numbers = {"label": f"TRL GKDTrainer (trl {result['versions']['trl']}, beta {gkd['beta']:g}, lmbda "
                        f"{gkd['lmbda']:g})",
               **score_model(setup, out / "model"), **{k: result[k] for k in counted if k in result},
               "size_mb": disk_mb(out / "model")}
    return {"trl": (numbers, out / "model")}


def data_summary(setup: Setup) -> dict:
    """peers.json's "data": kdistill's InstructionData.summary() and the training rows exported."""
    return json.loads((setup.data_dir / "data.json").read_text(encoding="utf-8"))


UNITS = {"task_score": "mean score in [0, 1]", "agreement_with_teacher": "share of test prompts",
         "response_tokens": "tokens per response", "targets": "response tokens learned",
         "tokens_per_s": "response tokens learned / s of train wall time (kdistill's: less validation, checkpoints)",
         "train_wall_time_s": "s", "validation_s": "s", "checkpoint_s": "s", "generate_tokens_per_s": "tokens/s",
         "size_mb": "MiB", "peak_rss_mb": "MiB"}


def notes(about: str, doc: dict) -> list[str]:
    """The instruction table's notes on the results page."""
    data, b = doc["data"], doc["budget"]
    student = doc["models"].get("kdistill:student", {})
    terms = ", ".join(f"{t} {w:g}" for t, w in b["losses"].items() if w)
    return [
        about,
        f"Data: {data['source']}: {data['gold_rows']:,} gold rows and {data['answered_by_teacher']:,} transfer "
        f"prompts with the teacher's stored responses ({data['sizes']['test']:,} test prompts), kdistill's rows "
        f"exported once as TRL's conversational `messages` and checked against the run's data fingerprint; every "
        f"model's greedy responses of at most {b['max_response_tokens']} tokens scored by kdistill's own generation "
        f"and scorer. Budget: {b['steps']} steps of {b['batch_size']} rows ({b['grad_accum']} micro-batches), lr "
        f"{b['lr']:g} (AdamW, {b['warmup_steps']} warmup steps, linear decay), weight decay {b['weight_decay']:g}, "
        f"max grad norm {b['max_grad_norm']:g}, prompts of at most {b['max_prompt_tokens']} tokens; loss {terms} at "
        f"T = {b['temperature']:g}, on-policy fraction {b['on_policy_fraction']:g} (GKD: beta, lmbda the same). Both "
        "students start from the same weights (kdistill's untrained student, saved) and learn from the same "
        "teacher, run live every step, in fp32 on the CPU.",
        PEER.note,
        "tokens learned/s: the response tokens each step's loss was summed over (the student's own on an on-policy "
        "step) per second of train wall time; kdistill's time (train wall) less its validation passes and the "
        f"checkpoints it writes at every epoch's end ({student.get('validation_s', 0.0):.1f} s and "
        f"{student.get('checkpoint_s', 0.0):.1f} s; TRL here validates and saves none). Where the two differ by "
        "construction: "
        "TRL's conversational rows also learn the newline the chat template writes after the end of turn (one "
        "token a row), and its collator cuts a row to max prompt + max response tokens from the left where "
        "kdistill cuts the prompt from the left and the response on the right; on an on-policy step TRL divides "
        "the summed loss by the response tokens of the rows it loaded (transformers' num_items_in_batch), kdistill "
        "by the tokens the student generated; kdistill draws on-policy steps (all of a step's micro-batches), TRL "
        "on-policy micro-batches. Wall times on a shared machine are noisy: compare within this table.",
    ]


PEER = Peer(name="trl", table="peers-instruct", packages=PACKAGES, worker="worker_trl.py", job=job, systems=systems,
            timeout_s=6 * 3600,
            note="**TRL**: `trl.experimental.gkd.GKDTrainer` (GKD has moved to TRL's experimental package; the "
                 "stable `DistillationTrainer` trains on-policy only, so it cannot learn from the rows' responses) "
                 "with a GKDConfig of the same budget, `lmbda` = kdistill's on-policy fraction, `beta` its "
                 "divergence (forward KL 0, reverse KL 1, jsd its gjsd_beta), sampling at temperature 1; its "
                 "default ChatML collator on the `messages` rows; fp32, no gradient checkpointing. The worker "
                 "only counts the tokens each step learns.")
