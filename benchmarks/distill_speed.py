"""kdistill vs a plain PyTorch loop vs TextBrewer 0.2.1: the same distillation, timed side by side in one process.

    python benchmarks/distill_speed.py --teacher runs/default-1/teacher                          # kd + ce
    python benchmarks/distill_speed.py --teacher runs/default-1/teacher --losses logits+hidden   # + hidden MSE
    python benchmarks/distill_speed.py --teacher runs/default-1/teacher --smoke                  # plumbing, seconds
    python benchmarks/distill_speed.py --teacher runs/default-1/teacher --systems kdistill plain textbrewer kdistill-bf16

TextBrewer is not a kdistill dependency: `pip install textbrewer==0.2.1` first, or it is reported as skipped.

Equal for every system: the teacher (--teacher, frozen); the student cut from the teacher
(_common.TEACHER_SLICE_STUDENT: 2 layers copied from teacher layers 0 and 5 by kdistill's make_student, built
once, each system starting from a copy of it); the data (kdistill's load_data of bbc-news: the same train and
test splits); epochs, hence optimizer steps; batch size;
AdamW at the recipe's lr with weight decay 0.01 except biases and LayerNorm, linear warmup over 10% of the steps
then linear decay, gradient-norm clip 1.0; torch's seed before each system; and the loss, per batch:
    logits          1.0 · T²·KL(p_T ‖ p_S) at T = 4   +  0.1 · CE(student, labels)
    logits+hidden   the same  +  1.0 · hidden MSE: the per-element mean squared error over real (unpadded) tokens,
                    averaged over the layer pairs (student layer 1 ↔ teacher layer 1, student 2 ↔ teacher 6,
                    the layers it was copied from; 0 = embeddings)

How each system gets there:
  kdistill    kdistill.pipeline.distill_student (explicit, the recipe's defaults): the frozen teacher's outputs
              computed once and read back every epoch where it can cache them (distill.cache_teacher: auto),
              length-grouped batches with dynamic padding, fused AdamW. It also validates once per epoch and keeps
              the best validation weights; that time counts.
  plain       the loop a user writes: every text padded to max_length, DataLoader(shuffle=True), the teacher run
              under no_grad every step, torch.optim.AdamW as it comes, get_linear_schedule_with_warmup.
  kdistill-bf16  (only when asked: --systems ... kdistill-bf16) kdistill with train.mixed_precision: bf16, teacher
              (cache pass) and student under bf16 autocast; the other systems stay fp32, so its ratios compare a
              precision choice too (on a CPU with AMX-BF16 it pays; see benchmarks/precision_compile.py).
  textbrewer  GeneralDistiller (its single-teacher distiller) on the same padded DataLoader, trained for the same
              number of steps; checkpoints at each epoch end into a temp dir, as its loop does. Its kd loss 'ce'
              is H(p_T, p_S) without the T² factor, so kd_loss_weight = T²·1.0 (the same gradient as T²·KL);
              it sums intermediate matches, so each hidden pair weighs 1.0 / number of pairs.

The plain loop also times its teacher forwards: `teacher_caching_ceiling_vs_plain` = its wall time / (wall time
minus that), the speed-up the plain loop would get from a teacher that cost nothing, the ceiling of what caching
the teacher's outputs can give (kdistill's other savings are dynamic padding and the fused optimizer step).

Timed per system: from the raw texts to the trained student (tokenization, kdistill's logit cache, training), not the
evaluation. samples_per_s = training examples × epochs / wall time. Each student is then scored on the test split by
the same function (kdistill.measure.predict + quality_metrics). Systems run one after another, so the machine's
load can differ between them: compare the ratios of one run, and repeat the run on a loaded machine.
Prints one JSON line on stdout (logs and progress bars on stderr).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's kdistill, installed or not
from benchmarks._common import TEACHER_SLICE_STUDENT, stdout_to_stderr  # noqa: E402

SYSTEMS = ("kdistill", "plain", "textbrewer", "kdistill-bf16")
DEFAULT_SYSTEMS = SYSTEMS[:3]
LOSSES = {
    "logits": {"kd": 1.0, "ce": 0.1},
    "logits+hidden": {"kd": 1.0, "ce": 0.1, "hidden_mse": 1.0},
}
SMOKE = {"limit": 32, "epochs": 0.5}
TEXTBREWER_MISSING = "textbrewer is not installed: pip install textbrewer==0.2.1"


# ------------------------------------------------------------------------------------------------ the plain loop

def masked_mse(student_hidden, teacher_hidden, mask):
    """Mean squared error per element over the real tokens. hidden: (B, L, D)   mask: (B, L), 1 = real token."""
    m = mask.unsqueeze(-1).to(student_hidden.dtype)
    return ((student_hidden - teacher_hidden) ** 2 * m).sum() / (m.sum() * student_hidden.shape[-1])


def plain_loss(student_out, teacher_out, labels, mask, *, weights: dict, temperature: float, pairs):
    """The distillation loss as a user writes it: weighted T²·KL at T, CE on labels, hidden MSE over `pairs`
    ((student, teacher) indices into hidden_states, 0 = embeddings)."""
    import torch.nn.functional as F

    t = temperature
    kd = F.kl_div(F.log_softmax(student_out.logits / t, -1), F.log_softmax(teacher_out.logits / t, -1),
                  log_target=True, reduction="batchmean") * t * t
    loss = weights["kd"] * kd + weights["ce"] * F.cross_entropy(student_out.logits, labels)
    if "hidden_mse" in weights:
        mse = sum(masked_mse(student_out.hidden_states[s], teacher_out.hidden_states[t_], mask) for s, t_ in pairs)
        loss = loss + weights["hidden_mse"] * mse / len(pairs)
    return loss


def padded_loader(split, tokenizer, max_length: int, batch_size: int, seed: int):
    """Every text padded to max_length, shuffled batches of dicts (labels included): the usual recipe, and the one
    of TextBrewer's examples."""
    import torch
    from torch.utils.data import DataLoader

    pair = split["text_pair"] if "text_pair" in split.column_names else None
    enc = tokenizer(list(split["text"]), pair, padding="max_length", truncation=True, max_length=max_length,
                    return_tensors="pt")
    labels = torch.tensor(split["label"])
    rows = [{**{k: v[i] for k, v in enc.items()}, "labels": labels[i]} for i in range(len(labels))]
    return DataLoader(rows, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))


def grouped_params(model, weight_decay: float) -> list[dict]:
    """AdamW groups as in the transformers examples: no weight decay on biases and LayerNorm weights."""
    no_decay = ("bias", "LayerNorm.weight")
    named = list(model.named_parameters())
    return [{"params": [p for n, p in named if not any(k in n for k in no_decay)], "weight_decay": weight_decay},
            {"params": [p for n, p in named if any(k in n for k in no_decay)], "weight_decay": 0.0}]


def train_plain(student, teacher, tokenizer, data, cfg, plan: dict) -> dict:
    import torch
    from transformers import get_linear_schedule_with_warmup

    train, device, hidden = cfg.train, plan["device"], plan["hidden"]
    loader = padded_loader(data.splits["train"], tokenizer, cfg.data.max_length, train.batch_size, train.seed)
    optimizer = torch.optim.AdamW(grouped_params(student, train.weight_decay), lr=train.lr)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(train.warmup_ratio * plan["steps"]), plan["steps"])
    teacher.to(device).eval()
    student.to(device).train()
    step, teacher_s = 0, 0.0
    while step < plan["steps"]:
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = batch.pop("labels")
            started = time.perf_counter()
            with torch.no_grad():
                teacher_out = teacher(**batch, output_hidden_states=hidden)
            if device == "cuda":
                torch.cuda.synchronize()  # (kernels run asynchronously: time them to the end)
            teacher_s += time.perf_counter() - started
            student_out = student(**batch, output_hidden_states=hidden)
            loss = plain_loss(student_out, teacher_out, labels, batch["attention_mask"], weights=plan["weights"],
                              temperature=cfg.distill.temperature, pairs=plan["pairs"])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), train.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            step += 1
            if step == plan["steps"]:
                break
    return {"steps": step, "teacher_forward_s": teacher_s}


# ---------------------------------------------------------------------------------------------------- TextBrewer

def textbrewer_adaptor(batch, outputs) -> dict:
    """What GeneralDistiller reads from a model's outputs: logits, hidden states, the hard-label loss, the mask."""
    out = {"logits": outputs.logits, "losses": outputs.loss, "inputs_mask": batch["attention_mask"]}
    if outputs.hidden_states is not None:
        out["hidden"] = outputs.hidden_states
    return out


def textbrewer_distiller(student, teacher, *, weights: dict, temperature: float, pairs, device, output_dir: str):
    """A GeneralDistiller whose objective has the gradient of `plain_loss` (see the module docstring)."""
    from textbrewer import DistillationConfig, GeneralDistiller, TrainingConfig

    matches = [{"layer_T": t, "layer_S": s, "feature": "hidden", "loss": "hidden_mse",
                "weight": weights["hidden_mse"] / len(pairs)} for s, t in pairs] if "hidden_mse" in weights else []
    distill_config = DistillationConfig(temperature=temperature, kd_loss_type="ce",
                                        kd_loss_weight=weights["kd"] * temperature ** 2,
                                        hard_label_weight=weights["ce"], intermediate_matches=matches)
    train_config = TrainingConfig(device=device, output_dir=output_dir, log_dir=None)
    return GeneralDistiller(train_config=train_config, distill_config=distill_config, model_T=teacher,
                            model_S=student, adaptor_T=textbrewer_adaptor, adaptor_S=textbrewer_adaptor)


def train_textbrewer(student, teacher, tokenizer, data, cfg, plan: dict) -> dict:
    import torch
    from transformers import get_linear_schedule_with_warmup

    train = cfg.train
    loader = padded_loader(data.splits["train"], tokenizer, cfg.data.max_length, train.batch_size, train.seed)
    teacher.to(plan["device"])
    student.to(plan["device"])
    with tempfile.TemporaryDirectory(prefix="distill-speed-textbrewer-") as out:
        distiller = textbrewer_distiller(student, teacher, weights=plan["weights"],
                                         temperature=cfg.distill.temperature, pairs=plan["pairs"],
                                         device=plan["device"], output_dir=out)
        # ckpt_steps: one checkpoint per epoch, as its epoch loop writes; num_steps (not num_epochs) so that a
        # fraction of an epoch (--smoke) runs too
        distiller.t_config.ckpt_steps = plan["steps_per_epoch"]
        optimizer = torch.optim.AdamW(grouped_params(student, train.weight_decay), lr=train.lr)
        with distiller:  # teacher in eval mode, student in train mode
            distiller.train(optimizer, loader, num_steps=plan["steps"], max_grad_norm=train.max_grad_norm,
                            scheduler_class=get_linear_schedule_with_warmup,
                            scheduler_args={"num_warmup_steps": int(train.warmup_ratio * plan["steps"]),
                                            "num_training_steps": plan["steps"]},
                            output_hidden_states=plan["hidden"])
    return {"steps": int(optimizer.state[next(student.parameters())]["step"])}  # the optimizer steps it took


def textbrewer_missing() -> str | None:
    try:
        import textbrewer  # noqa: F401
    except ImportError as e:
        return f"{TEXTBREWER_MISSING} ({e})"
    return None


# ------------------------------------------------------------------------------------------------------ kdistill

def train_kdistill(student, teacher, tokenizer, data, cfg, plan: dict) -> dict:
    from kdistill.data import tokenize_splits
    from kdistill.pipeline import distill_student

    encoded = tokenize_splits(data, tokenizer, cfg.data.max_length, ("train", "validation"))
    with tempfile.TemporaryDirectory(prefix="distill-speed-kdistill-") as run_dir:
        history, _ = distill_student(cfg, teacher, tokenizer, encoded, Path(run_dir), plan["init_layers"], student)
    return {"steps": len(history.steps)}


def train_kdistill_bf16(student, teacher, tokenizer, data, cfg, plan: dict) -> dict:
    bf16 = cfg.model_copy(update={"train": cfg.train.model_copy(update={"mixed_precision": "bf16"})})
    return train_kdistill(student, teacher, tokenizer, data, bf16, plan)


TRAIN = {"kdistill": train_kdistill, "plain": train_plain, "textbrewer": train_textbrewer,
         "kdistill-bf16": train_kdistill_bf16}
"""Each trains the student in place and returns the optimizer steps it took ("steps"), and what else it timed."""


# ---------------------------------------------------------------------------------------------------------- main

def load_setup(args):
    """(config, data, teacher, tokenizer, initial student, plan shared by the systems, encoded test split)."""
    import torch

    from kdistill.config import load_config, parse_override
    from kdistill.data import Encodings, load_data
    from kdistill.errors import UserError
    from kdistill.pipeline import calibration_batch, get_teacher, make_student, term_spec

    items = [f"teacher.path={args.teacher}", f"data.max_length={args.max_length}", f"train.epochs={args.epochs}",
             f"distill.losses={json.dumps(LOSSES[args.losses])}"]
    if args.limit:
        items.append(f"data.limit={args.limit}")
    if args.batch_size:
        items.append(f"train.batch_size={args.batch_size}")
    if args.threads:
        items.append(f"train.num_threads={args.threads}")
    for item in args.set:
        if parse_override(item)[0][0] != "data":
            raise UserError(f"--set {item}: only data.* keys apply here (the rest must stay equal across systems)")
    cfg = load_config("default", TEACHER_SLICE_STUDENT + items + list(args.set))
    data = load_data(cfg.data)
    # teacher.path is set: get_teacher loads it and checks its labels against the data's; it writes no run dir
    encodings = Encodings(cfg.data.max_length)
    teacher, tokenizer, _, _ = get_teacher(cfg, data, encodings, Path(tempfile.gettempdir()))
    encoded = encodings(data, tokenizer, ("train", "validation", "test"))
    student, init_layers = make_student(cfg, teacher, calibration_batch(encoded["train"], tokenizer))
    hidden = "hidden_mse" in LOSSES[args.losses]
    if hidden and student.config.hidden_size != teacher.config.hidden_size:
        raise UserError("--losses logits+hidden: the student is narrower than the teacher; the plain loop and "
                        "TextBrewer here have no projection for that")
    n_batches = math.ceil(len(data.splits["train"]) / cfg.train.batch_size)
    plan = {
        "weights": LOSSES[args.losses], "hidden": hidden, "init_layers": init_layers,
        "pairs": term_spec(cfg, teacher, student, init_layers).pairs,
        "steps": math.ceil(n_batches * cfg.train.epochs), "steps_per_epoch": n_batches,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }
    return cfg, data, teacher, tokenizer, student, plan, encoded["test"]


def score(student, tokenizer, encoded_test, label_names) -> dict:
    from kdistill.measure import predict, quality_metrics

    preds = predict(student.cpu(), encoded_test, tokenizer)
    metrics = quality_metrics(preds, list(encoded_test["labels"]), label_names)
    return {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"]}


def run_system(name: str, setup) -> dict:
    import torch

    cfg, data, teacher, tokenizer, student0, plan, encoded_test = setup
    student = copy.deepcopy(student0)
    torch.manual_seed(cfg.train.seed)
    print(f"distill_speed: {name}, {plan['steps']} steps", file=sys.stderr)
    started = time.perf_counter()
    timed = TRAIN[name](student, teacher, tokenizer, data, cfg, plan)
    wall = time.perf_counter() - started
    steps = timed.pop("steps")
    if steps != plan["steps"]:
        raise RuntimeError(f"{name} took {steps} optimizer steps instead of {plan['steps']}: not comparable")
    examples = len(data.splits["train"]) * cfg.train.epochs
    return {"samples_per_s": examples / wall, "wall_time_s": wall, "steps": steps, **timed,
            **score(student, tokenizer, encoded_test, data.label_names)}


def caching_ceiling(plain: dict) -> float | None:
    """The plain loop's speed-up if its teacher forwards cost nothing: wall / (wall - time in teacher forwards).
    The most that computing the teacher's outputs once, instead of every step, can give on this data; more needs
    a cheaper student step (or less padding)."""
    if "teacher_forward_s" not in plain:
        return None
    return plain["wall_time_s"] / (plain["wall_time_s"] - plain["teacher_forward_s"])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True, help="a trained teacher model dir (e.g. runs/default-1/teacher)")
    parser.add_argument("--losses", choices=list(LOSSES), default="logits")
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(DEFAULT_SYSTEMS),
                        help="kdistill-bf16: kdistill with train.mixed_precision=bf16 (not run by default)")
    parser.add_argument("--epochs", type=float, help="student epochs (default 3; --smoke: 0.5)")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per example (data.max_length)")
    parser.add_argument("--batch-size", type=int, help="examples per step (default: the default recipe's)")
    parser.add_argument("--limit", type=int, help="cap on examples per split (data.limit; --smoke: 32)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--smoke", action="store_true", help="a seconds-long plumbing run: tiny data, half an epoch")
    parser.add_argument("--set", action="append", default=[], metavar="data.KEY=VALUE",
                        help="data overrides, e.g. data.train_file=my.csv")
    args = parser.parse_args(argv)
    defaults = SMOKE if args.smoke else {"limit": None, "epochs": 3.0}
    args.limit = args.limit or defaults["limit"]
    args.epochs = args.epochs or defaults["epochs"]

    import torch

    from kdistill.errors import UserError
    from kdistill.measure import machine_info

    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {}
    try:
        with stdout_to_stderr():
            setup = load_setup(args)
            for name in args.systems:
                skipped = textbrewer_missing() if name == "textbrewer" else None
                results[name] = {"skipped": skipped} if skipped else run_system(name, setup)
    except UserError as e:
        print(f"distill_speed: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    cfg, data, _, _, student, plan, _ = setup

    def speedup(ours: str, other: str) -> float | None:
        a, b = results.get(ours, {}), results.get(other, {})
        return a["samples_per_s"] / b["samples_per_s"] if "samples_per_s" in a and "samples_per_s" in b else None

    line = {
        "benchmark": "distill_speed", "teacher": args.teacher, "data": data.source, "losses": args.losses,
        "loss_weights": plan["weights"], "temperature": cfg.distill.temperature,
        "layer_pairs": [list(p) for p in plan["pairs"]],
        "epochs": cfg.train.epochs, "steps": plan["steps"], "batch_size": cfg.train.batch_size, "lr": cfg.train.lr,
        "max_length": cfg.data.max_length, "limit": cfg.data.limit, "n_train": len(data.splits["train"]),
        "n_test": len(data.splits["test"]), "student_params": sum(p.numel() for p in student.parameters()),
        "systems": results,
        "speedup_samples_per_s": {
            "kdistill_vs_plain": speedup("kdistill", "plain"), "kdistill_vs_textbrewer": speedup("kdistill", "textbrewer"),
            **({"kdistill_bf16_vs_plain": speedup("kdistill-bf16", "plain"),
                "kdistill_bf16_vs_textbrewer": speedup("kdistill-bf16", "textbrewer")}
               if "kdistill-bf16" in results else {})},
        "teacher_caching_ceiling_vs_plain": caching_ceiling(results.get("plain", {})),
        "device": plan["device"], "threads": torch.get_num_threads(), "machine": machine_info(),
        "smoke": args.smoke,
    }
    print(json.dumps(line))
    return line


if __name__ == "__main__":
    main()
