"""Task `instruction`: an instruction-tuned causal LM (the teacher) answers prompts; a smaller one (the student)
learns to answer them as well, and every model is scored on the task by its responses.

Data: chat rows (JSONL: OpenAI-style `messages`, or `prompt` + optional `completion`; data.chat), or a built-in
instruction dataset (`kdistill datasets`). Each model renders them with its own chat template; only response tokens
are learned and scored (`LMBlocks.prompt_lengths`). The training rows with a gold response are the first
`data.labeled_limit` (all of them when unset); the other training prompts are the transfer set, which the teacher
answers once (`cache.teacher_responses`, stored and reused across runs and seeds).

How the student learns from the teacher is said by the recipe's terms, one run per way, comparable in one report:
  - sequence-level (black-box; Kim & Rush 2016): `lm` on the gold rows and the teacher-answered prompts; works with
    a student over another tokenizer (the responses are text);
  - token-level: `forward_kl`, `reverse_kl`, `jsd` (+ `lm`) on the response tokens of those rows, the live teacher's
    distribution at each (one tokenizer);
  - on-policy (GKD, Agarwal et al. 2024): `distill.on_policy_fraction` of the steps train on the student's own
    sampled responses to the prompts, scored token by token by the teacher (e.g. `reverse_kl`).
A teacher behind an OpenAI-compatible endpoint (teacher.endpoint; kdistill.teacher_endpoint) is asked for its
responses over HTTP instead of loaded: sequence-level only (its answers are text), into a student.model; its size
and speed are not known here.
The no-KD control is the same student fine-tuned with `lm` on the gold rows alone, for as many steps.

Score: each model (teacher, student, no-KD baseline, the untrained student) answers the test prompts greedily; a
scorer (eval.scorer: a built-in by name or `module:function`) turns each response into a task score in [0, 1];
plus agreement with the teacher's answers, response length and generation speed, and sample responses side by
side in the report.
"""

from __future__ import annotations

import copy
import json
import logging
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from kdistill.cache.responses import teacher_responses
from kdistill.config import RunConfig
from kdistill.data import LMBlocks, pad_id_of
from kdistill.data.chat import ChatExample, encode_chat, with_shots
from kdistill.data.instructions import InstructionData, load_instruction_data
from kdistill.errors import UserError
from kdistill.generation import generate
from kdistill.io import atomic_write_json
from kdistill.measure import machine_info
from kdistill.models import dir_size_mb, load_causal_lm, load_tokenizer, read_meta
from kdistill.pipeline.common import run_dir_of, train_lm_phase, writing
from kdistill.pipeline.preflight import preflight
from kdistill.pipeline.students import make_student, term_spec
from kdistill.io import atomic_write_text
from kdistill.reporting import budget_line, student_line, summary_table, write_report
from kdistill.rundir import run_dir_for, run_fingerprint
from kdistill.scorers import agreement, get_scorer, score
from kdistill.strategies.causal import lm_only_spec
from kdistill.strategies.phase import Phase
from kdistill.student import describe_student
from kdistill.task import Task
from kdistill.teacher import load_causal_teacher
from kdistill.teacher_endpoint import api_key, endpoint_responses
from kdistill.terms import TERMS, TermSpec, check_terms
from kdistill.training import plan_steps

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ rows, blocks

@dataclass
class Reader:
    """One model's view of the chat rows: its tokenizer, the id that ends its turn, its pad id."""

    tokenizer: object
    end_id: int
    """The template's end of turn (e.g. <|im_end|>): what a response ends with, and where generation stops."""
    pad_id: int

    @property
    def stop_ids(self) -> set[int]:
        """Generation stops at the end of turn, or at the tokenizer's EOS if a model writes that instead."""
        eos = self.tokenizer.eos_token_id
        return {self.end_id} | ({eos} if eos is not None else set())

    @classmethod
    def of(cls, tokenizer) -> "Reader":
        # the template's end of turn (e.g. <|im_end|>) is the last id of any encoded response
        probe = ChatExample(({"role": "user", "content": "hi"},), "ok", {}, "<end-of-turn probe>")
        end = encode_chat(tokenizer, probe, max_prompt_tokens=64, max_response_tokens=64).response_ids[-1]
        return cls(tokenizer, end, pad_id_of(tokenizer))

    def prompts(self, examples: list[ChatExample], max_prompt_tokens: int) -> list[list[int]]:
        """Each example's rendered prompt (ids), cut from the left to `max_prompt_tokens` (logged)."""
        encoded = [encode_chat(self.tokenizer, e, max_prompt_tokens=max_prompt_tokens, max_response_tokens=1)
                   for e in examples]
        cut = sum(e.prompt_truncated > 0 for e in encoded)
        if cut:
            log.info("%d of %d prompts longer than %d tokens lost their first tokens", cut, len(encoded),
                     max_prompt_tokens)
        return [e.prompt_ids for e in encoded]

    def blocks(self, examples: list[ChatExample], responses: list[str | None], cfg, what: str) -> LMBlocks:
        """Prompt + response rows, right-padded to the longest: only the response tokens are targets."""
        rows, cut = [], 0
        for e, response in zip(examples, responses):
            enc = encode_chat(self.tokenizer, e, max_prompt_tokens=cfg.max_prompt_tokens,
                              max_response_tokens=cfg.max_response_tokens, response=response)
            rows.append((enc.prompt_ids, enc.response_ids))
            cut += enc.prompt_truncated > 0
        if cut:
            log.info("%s: %d of %d prompts longer than data.max_prompt_tokens (%d) lost their first tokens", what,
                     cut, len(rows), cfg.max_prompt_tokens)
        width = max(len(p) + len(r) for p, r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, (p, r) in enumerate(rows):
            ids[i, : len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
            mask[i, : len(p) + len(r)] = 1
        return LMBlocks(ids, mask, prompt_lengths=torch.tensor([len(p) for p, _ in rows], dtype=torch.long))

    def text(self, ids: list[int]) -> str:
        """A response's text: its end of turn dropped."""
        return self.tokenizer.decode([t for t in ids if t not in self.stop_ids], skip_special_tokens=True).strip()


def teacher_prompts(reader: Reader, examples: list[ChatExample], data: InstructionData, cfg: RunConfig):
    """The teacher's rendered prompts: with its in-context gold rows (teacher.shots), each shot adding
    data.max_prompt_tokens of room."""
    shots = data.gold[: cfg.teacher.shots]
    return reader.prompts(with_shots(examples, shots), cfg.data.max_prompt_tokens * (1 + len(shots)))


def student_reader(cfg: RunConfig, teacher_reader: Reader | None) -> Reader:
    """The student's view: the teacher's tokenizer, or a student.model's own (sequence-level terms only: token-level
    and on-policy terms compare the two models token by token). teacher_reader None: the teacher is behind an
    endpoint, its tokenizer unknown."""
    if not cfg.student.model:
        return teacher_reader
    tokenizer = load_tokenizer(cfg.student.model)
    if teacher_reader is None or tokenizer.get_vocab() == teacher_reader.tokenizer.get_vocab():
        return Reader.of(tokenizer)
    token_level = sorted(t for t, w in cfg.distill.losses.items() if w > 0 and TERMS[t].reads)
    if token_level or cfg.distill.on_policy_fraction:
        raise UserError(f"student.model: {cfg.student.model} has another tokenizer than the teacher, so "
                        f"{', '.join(token_level) or 'on-policy steps'} cannot compare them token by token; learn "
                        "the teacher's responses (sequence-level: distill.losses {lm: 1.0}) or use one tokenizer")
    return Reader.of(tokenizer)


def endpoint_name(cfg: RunConfig) -> str:
    """How reports name a teacher behind an endpoint: the served model and where."""
    return f"{cfg.teacher.endpoint.model} at {cfg.teacher.endpoint.url}"


def teacher_answers(cfg: RunConfig, teacher, reader: Reader | None, examples: list[ChatExample],
                    data: InstructionData, what: str) -> tuple[list[str], list[int | None], dict]:
    """The teacher's responses to `examples` (text, made after its in-context gold rows: teacher.shots), their
    lengths in tokens (None where an endpoint does not count them), and the store's info: generated by the teacher
    loaded here (`reader` its view), or asked of teacher.endpoint. Both are stored once and reused."""
    endpoint = cfg.teacher.endpoint
    if endpoint is not None:
        conversations = [e.prompt for e in with_shots(examples, data.gold[: cfg.teacher.shots])]
        texts, tokens, info = endpoint_responses(endpoint, conversations, max_tokens=cfg.data.max_response_tokens,
                                                 what=what)
        return [t.strip() for t in texts], tokens, info  # trimmed as Reader.text trims a decoded response
    prompts = teacher_prompts(reader, examples, data, cfg)
    ids, info = teacher_responses(teacher, prompts, pad_id=reader.pad_id, stop_ids=reader.stop_ids,
                                  max_new_tokens=cfg.data.max_response_tokens, batch_size=cfg.train.batch_size)
    return [reader.text(r) for r in ids], [len(r) for r in ids], info


# ------------------------------------------------------------------------------------------------------- run

def training_rows(cfg: RunConfig, data: InstructionData, teacher, teacher_reader: Reader | None):
    """(examples, responses, the teacher's answer info): the rows the student learns, the gold rows with their
    responses, then the transfer prompts with the teacher's responses (made once, stored, reused), a prompt it
    answered with nothing left out. None for the info when there is no transfer prompt."""
    gold, transfer = list(data.gold), list(data.transfer)
    answered, answer_info = [], None
    if transfer:
        answered, _, answer_info = teacher_answers(cfg, teacher, teacher_reader, transfer, data, "transfer prompts")
        empty = sum(not a for a in answered)
        if empty:
            log.warning("teacher: %d of %d transfer prompts got an empty response; they are left out", empty,
                        len(answered))
        kept = [(e, a) for e, a in zip(transfer, answered) if a]
        transfer, answered = [e for e, _ in kept], [a for _, a in kept]
    return gold + transfer, [e.response for e in gold] + answered, answer_info


def run_instruction(cfg: RunConfig, out: str | Path | None = None, *, resume: bool = False,
                    overwrite: bool = False) -> Path:
    """`kdistill run` for the instruction task: chat rows -> the teacher's responses to the transfer prompts (once)
    -> student and no-KD baseline -> every model answers the test prompts -> task scores, metrics.json, report."""
    started = time.perf_counter()
    run_dir = run_dir_of(cfg, out)
    preflight(cfg, run_dir, resume=resume, overwrite=overwrite)
    data = load_instruction_data(cfg.data)
    scorer = get_scorer(cfg.eval.scorer or data.scorer, **{**data.scorer_options, **cfg.eval.scorer_options})
    if cfg.teacher.endpoint is None:
        teacher, tokenizer, teacher_name, _ = load_causal_teacher(cfg)
        teacher_reader = Reader.of(tokenizer)
    else:  # nothing to load: the teacher answers over HTTP, in text
        teacher, teacher_reader, teacher_name = None, None, endpoint_name(cfg)
    reader = student_reader(cfg, teacher_reader)
    kd_rows, kd_responses, answer_info = training_rows(cfg, data, teacher, teacher_reader)
    gold = list(data.gold)
    blocks = {"train": reader.blocks(kd_rows, kd_responses, cfg.data, "train"),
              "gold": reader.blocks(gold, [e.response for e in gold], cfg.data, "gold"),
              "validation": reader.blocks(data.splits["validation"],
                                          [e.response for e in data.splits["validation"]], cfg.data, "validation")}
    fingerprint = run_fingerprint(cfg, {"train": [json.dumps([e.prompt, r]) for e, r in zip(kd_rows, kd_responses)],
                                        "validation": [json.dumps(e.prompt) for e in data.splits["validation"]]})
    with run_dir_for(cfg, run_dir, fingerprint, resume=resume, overwrite=overwrite), writing(run_dir):
        models, histories, shapes = train_phases(cfg, run_dir, blocks, teacher, reader, resume=resume,
                                                 fingerprint=fingerprint)
        return evaluate_instruction_run(cfg, run_dir, data, models, histories, shapes, scorer, teacher_reader,
                                        reader, teacher_name, answer_info, started)


def train_phases(cfg: RunConfig, run_dir: Path, blocks: dict[str, LMBlocks], teacher, reader: Reader, *,
                 resume: bool, fingerprint: dict):
    """The KD student and the no-KD baseline (the gold rows alone, as many steps), each saved; a resumed run
    skips the saved ones. Returns (models by name, histories by name, the student's shape). teacher None: it is
    behind an endpoint (the terms read nothing from it; the student is a student.model)."""
    calibration = {k: v for k, v in blocks["train"].batch(slice(0, 8)).items() if k != "prompt_length"}
    student, init_layers = make_student(cfg, teacher, calibration)
    untrained = copy.deepcopy(student)
    shapes = describe_student(teacher, student)
    if shapes["init"] is None:  # a student.model taken whole
        shapes["init"] = {"pretrained": cfg.student.model}
    baseline = copy.deepcopy(student) if cfg.distill.baseline else None  # same init: the loss is the only change
    spec = term_spec(cfg, teacher, student, init_layers) if teacher is not None else \
        TermSpec.of_recipe(cfg.distill.losses, [], cfg.distill)
    steps = plan_steps(-(-len(blocks["train"]) // (cfg.train.batch_size // cfg.train.grad_accum)),
                       cfg.train.grad_accum, cfg.train.epochs, cfg.train.max_steps)
    meta = {"task": cfg.task, "max_length": cfg.data.max_prompt_tokens + cfg.data.max_response_tokens,
            "strategy": cfg.distill.strategy,
            "teacher": cfg.teacher.model if cfg.teacher.endpoint is None else endpoint_name(cfg),
            "student_init": shapes["init"]}
    phases = {"student": (student, spec, blocks["train"], cfg.train, {**meta, "losses": cfg.distill.losses})}
    if baseline is not None:  # as many steps as the student, on the gold rows alone
        phases["baseline"] = (baseline, lm_only_spec(), blocks["gold"], cfg.train.model_copy(update={"max_steps": steps}),
                              {**meta, "role": "no-KD baseline", "losses": {"lm": 1.0}})
    models, histories = {"teacher": teacher, "untrained": untrained}, {"teacher": None, "untrained": None}
    for name, (model, phase_spec, train_blocks, train, phase_meta) in phases.items():
        phase = Phase(model, [teacher] if any(TERMS[t].reads for t in phase_spec.active) else [],
                      reader.tokenizer, {"train": train_blocks, "validation": blocks["validation"]}, phase_spec,
                      cfg.distill, train, cfg.task, name=name)
        models[name], histories[name] = train_lm_phase(cfg, run_dir, phase, resume=resume, fingerprint=fingerprint,
                                                       meta={**phase_meta, "role": phase_meta.get("role", name)},
                                                       pad_id=reader.pad_id, eos_id=reader.end_id,
                                                       max_new_tokens=cfg.data.max_response_tokens)
    return models, histories, shapes


# -------------------------------------------------------------------------------------------------- evaluate

def answer(name: str, model, reader: Reader | None, data: InstructionData, cfg: RunConfig):
    """A model's greedy responses to the test prompts (text), their lengths in tokens (None where an endpoint does
    not count them) and the generation's cost. The teacher's are stored and reused like its training answers, and
    made with its in-context gold rows (teacher.shots)."""
    test = data.splits["test"]
    if name == "teacher":
        texts, tokens, info = teacher_answers(cfg, model, reader, test, data, "test prompts")
        # an endpoint's speed is its server's, with its own load and concurrency: not measured here
        return texts, tokens, {"generate_tokens_per_s": info.get("generate_tokens_per_s"), "calls": info["calls"],
                               "reused": info["reused"]}
    prompts = reader.prompts(test, cfg.data.max_prompt_tokens)
    made = generate(model, prompts, pad_id=reader.pad_id, stop_ids=reader.stop_ids,
                    max_new_tokens=cfg.data.max_response_tokens, batch_size=cfg.train.batch_size,
                    progress=f"{name} answers")
    return ([reader.text(x) for x in made.responses], [len(x) for x in made.responses],
            {"generate_tokens_per_s": made.tokens_per_s})


def evaluate_instruction_run(cfg: RunConfig, run_dir: Path, data: InstructionData, models: dict, histories: dict,
                             shapes: dict, scorer, teacher_reader: Reader, reader: Reader, teacher_name: str,
                             answer_info: dict | None, started: float) -> Path:
    """Every model answers the test prompts; task score, agreement with the teacher, response length, speed,
    sample responses; metrics.json and the report."""
    test = data.splits["test"]
    fields = [e.fields for e in test]
    results, texts = {}, {}
    for name, model in models.items():
        r = teacher_reader if name == "teacher" else reader
        torch.set_num_threads(cfg.eval.num_threads or torch.get_num_threads())
        texts[name], tokens, speed = answer(name, model, r, data, cfg)
        scored = score(scorer, texts[name], fields)
        results[name] = {"task_score": scored["mean"], "extracted": scored["extracted"],
                         "response_tokens": None if None in tokens else sum(tokens) / max(1, len(tokens)),
                         "empty_responses": sum(not t for t in texts[name]),
                         # a teacher behind an endpoint: its size is unknown here
                         "params": sum(p.numel() for p in model.parameters()) if model is not None else None,
                         **speed}
        if name in histories and histories[name] is not None:
            results[name]["train_wall_time_s"] = histories[name].wall_time_s
            results[name]["training"] = histories[name].budget()
        elif name not in ("teacher", "untrained"):
            meta = read_meta(run_dir / name)
            results[name]["train_wall_time_s"] = meta.get("train_wall_time_s")
            results[name]["training"] = meta.get("training")
        if name not in ("teacher", "untrained"):
            results[name]["size_mb"] = dir_size_mb(run_dir / name)
    teachers_answers = results["teacher"]["extracted"]
    teacher_params = results["teacher"]["params"]
    for name, r in results.items():
        mine = r.pop("extracted")
        r["agreement_with_teacher"] = agreement(mine, teachers_answers)
        r["size_ratio_vs_teacher"] = teacher_params / r["params"] if teacher_params is not None else None
    samples = [{"prompt": e.prompt[-1]["content"], "gold": e.response, **{n: texts[n][i] for n in texts}}
               for i, e in enumerate(test[: cfg.eval.samples])]
    metrics = {
        "run": cfg.name, "task": cfg.task, "strategy": cfg.distill.strategy, "teacher": teacher_name,
        "scorer": cfg.eval.scorer or data.scorer,
        "data": {**data.summary(), "max_prompt_tokens": cfg.data.max_prompt_tokens,
                 "max_response_tokens": cfg.data.max_response_tokens},
        "teacher_endpoint": ({"url": cfg.teacher.endpoint.url, "model": cfg.teacher.endpoint.model}
                             if cfg.teacher.endpoint is not None else None),
        "teacher_responses": answer_info, "teacher_shots": min(cfg.teacher.shots, len(data.gold)),
        "losses": cfg.distill.losses,
        "on_policy_fraction": cfg.distill.on_policy_fraction,
        "student_shape": shapes, "models": results, "samples": samples,
        "machine": {**machine_info(), "host": socket.gethostname(),
                    "eval_threads": cfg.eval.num_threads or torch.get_num_threads()},
        "units": {"task_score": "mean score in [0, 1]", "agreement_with_teacher": "share of test prompts",
                  "response_tokens": "tokens per response", "generate_tokens_per_s": "tokens/s",
                  "size_mb": "MiB", "train_wall_time_s": "s"},
        "total_wall_time_s": time.perf_counter() - started,
    }
    atomic_write_json(run_dir / "metrics.json", metrics)
    write_report([run_dir])
    log.info("instruction run done in %.0f s: %s", metrics["total_wall_time_s"],
             json.dumps({n: round(r["task_score"], 4) for n, r in results.items()}))
    return run_dir


# ---------------------------------------------------------------------------------------------------- report

COLUMNS = [
    ("task_score", "task score", "{:.2%}"),
    ("agreement_with_teacher", "agrees with teacher", "{:.2%}"),
    ("response_tokens", "tokens / response", "{:.1f}"),
    ("empty_responses", "empty", "{}"),
    ("params", "params", "{:,}"),
    ("size_ratio_vs_teacher", "size ratio", "{:.2f}x"),
    ("generate_tokens_per_s", "generate (tok/s)", "{:.1f}"),
    ("train_wall_time_s", "train time (s)", "{:.0f}"),
]


def verdict(metrics: dict) -> str:
    """Which way won, in words: the KD student against the no-KD baseline (and the untrained student), and what the
    teacher's answers cost."""
    models = metrics["models"]
    kd, teacher = models.get("student"), models["teacher"]
    parts = [f"The teacher scores {teacher['task_score']:.2%}"]
    if kd is not None:
        parts.append(f"the distilled student {kd['task_score']:.2%}")
    if "baseline" in models:
        parts.append(f"the same student fine-tuned on the gold responses alone {models['baseline']['task_score']:.2%}")
    if "untrained" in models:
        parts.append(f"untrained {models['untrained']['task_score']:.2%}")
    line = ", ".join(parts) + "."
    if kd is not None and "baseline" in models:
        gain = 100 * (kd["task_score"] - models["baseline"]["task_score"])
        line += (f" Distillation {'wins' if gain > 0 else 'loses' if gain < 0 else 'ties'} by {abs(gain):.1f} points "
                 f"({', '.join(f'{t} {w:g}' for t, w in metrics['losses'].items() if w)}"
                 f"{', on-policy fraction ' + format(metrics['on_policy_fraction'], 'g') if metrics['on_policy_fraction'] else ''}).")
        if gain < 0 and teacher["task_score"] < models["baseline"]["task_score"]:
            line += (" The teacher scores below the student fine-tuned on the gold responses: its answers teach less "
                     "than the gold ones do; a stronger teacher (teacher.shots, a larger model) or fewer gold rows "
                     "is where distillation pays.")
    answers = metrics.get("teacher_responses")
    shots = metrics.get("teacher_shots")
    if answers:
        reused = answers["prompts"] - answers["calls"]  # not answers["reused"]: a bool in older metrics.json
        line += (f" The teacher answered {answers['prompts']:,} transfer prompts "
                 + (f"with {shots} gold rows in context " if shots else "")
                 + ("(read from its stored responses)." if not answers["calls"] else
                    f"in {answers['generate_seconds']:.0f} s ({answers['calls']:,} calls"
                    + (f", {reused:,} read from the store" if reused else "") + ", stored for reuse)."))
    endpoint = metrics.get("teacher_endpoint")
    if endpoint:
        line += (f" The teacher is {endpoint['model']} behind {endpoint['url']}: its answers came over HTTP, its size "
                 "and speed are not known here.")
    return line


def write_instruction_report(runs: list[dict], out: Path) -> Path:
    """report.md of instruction runs: which way won, the table of task scores, agreement, length and speed, the
    data, the student's shape and training, and sample responses side by side."""
    lines = [f"# kdistill report: {', '.join(r['metrics']['run'] for r in runs)}", ""]
    lines += [line for run in runs for line in (verdict(run["metrics"]), "")]
    lines += [summary_table(runs), ""]
    for run in runs:
        m = run["metrics"]
        d = m["data"]
        lines += [f"Data ({m['run']}): {d['source']}: {d['gold_rows']:,} gold rows and {d['transfer_prompts']:,} "
                  f"prompts the teacher answered; {d['sizes']['test']:,} test prompts, scored by `{m['scorer']}` "
                  f"on greedy responses of at most {d['max_response_tokens']} tokens (prompts of at most "
                  f"{d['max_prompt_tokens']}). `untrained`: the student before any training; `baseline`: the same "
                  "student fine-tuned on the gold responses alone for as many steps.", ""]
        if m.get("student_shape"):
            lines += [student_line(m["student_shape"]), ""]
        budget = budget_line(m)
        if budget:
            lines += [budget, ""]
        if m.get("samples"):
            names = list(m["models"])
            lines += [f"## Sample responses ({m['run']})", ""]
            for sample in m["samples"]:
                prompt = " ".join(sample["prompt"].split())
                lines += [f"**{prompt[:300]}{'…' if len(prompt) > 300 else ''}**", "",
                          f"- *gold*: {sample['gold']}"] + \
                         [f"- *{n}*: {' '.join(str(sample.get(n, '')).split())}" for n in names] + [""]
    return atomic_write_text(out / "report.md", "\n".join(lines))


# ------------------------------------------------------------------------------------------------------ task

def check_config(cfg) -> None:
    if cfg.data.unlabeled_file or cfg.data.augment:
        raise ValueError("data.unlabeled_file and data.augment: the instruction task's transfer set is its training "
                         "prompts without a gold response (data.labeled_limit)")
    if cfg.distill.strategy != "explicit":
        raise ValueError(f"distill.strategy: instruction supports explicit (a frozen teacher), not "
                         f"{cfg.distill.strategy}")
    if cfg.distill.seq_kd_fraction:
        raise ValueError("distill.seq_kd_fraction: the instruction task learns the teacher's stored responses to its "
                         "transfer prompts instead (sequence-level KD with the lm term)")
    if cfg.data.train_file and not cfg.eval.scorer:
        raise ValueError("eval.scorer: your own data has no built-in scorer; name one (exact_match, pattern, label, "
                         "entity_f1) or your module:function")
    if cfg.distill.teacher_signal or cfg.distill.extra_teachers:
        raise ValueError("distill.teacher_signal and distill.extra_teachers: not supported by the instruction task")
    if cfg.teacher.endpoint is not None:
        check_endpoint_config(cfg)


def check_endpoint_config(cfg) -> None:
    """What a teacher behind an endpoint cannot do: its answers are text, without its distribution at each token
    (top_logprobs over the wire is not read), and no weights are here to cut a student from."""
    token_level = sorted(t for t, w in cfg.distill.losses.items() if w > 0 and TERMS[t].reads)
    if token_level:
        raise ValueError(f"distill.losses: {', '.join(token_level)} read(s) the teacher's distribution at every "
                         "token, which teacher.endpoint does not give (its answers are text); learn its responses: "
                         "{lm: 1.0}")
    if cfg.distill.on_policy_fraction:
        raise ValueError("distill.on_policy_fraction: on-policy steps score the student's own tokens by the "
                         "teacher's distribution, which teacher.endpoint does not give; set it to 0")
    if not cfg.student.model:
        raise ValueError("student.model: with teacher.endpoint no teacher weights are here to cut a student from; "
                         "name a pretrained causal LM (a built-in alias such as smollm2-135m, a model dir or a "
                         "hub id)")


def check_recipe(cfg, *, distilling: bool) -> None:
    if cfg.teacher.endpoint is not None:
        api_key(cfg.teacher.endpoint)  # its variable is set, before any data is read
    if distilling:
        try:
            check_terms(cfg.distill.losses, cfg.task)
        except ValueError as e:
            raise UserError(f"distill.losses: {e}") from None


def student_model(cfg, _teacher):
    return load_causal_lm(cfg.student.model)


TASK = Task(
    name="instruction",
    summary="An instruction-tuned decoder answers prompts; scored on the task by its responses (a scorer), with "
            "agreement with the teacher and generation speed.",
    term_units={"next_token": None, "hidden": "targets"},
    headline=("task_score", "agreement_with_teacher"),
    run=run_instruction,
    auto_model=AutoModelForCausalLM,
    features=frozenset({"prune_student_model", "held_out_limit", "teacher_endpoint"}),
    length_key="data.max_prompt_tokens",
    check_config=check_config,
    preflight=check_recipe,
    student_model=student_model,
    default_losses={"lm": 1.0},
    report_columns=COLUMNS,
    report=write_instruction_report,
)
