"""The shared training loop: how batches are split across processes and resumed mid-epoch, and how a run stops with
an error a user can act on (a NaN loss names its step and term; a run dir that cannot be written names the path),
and the CPU dropout it trains with (FastDropout)."""

from __future__ import annotations

import errno
import json
import os
import re
import resource
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from transformers import BertForSequenceClassification

from kdistill.checkpoint import COMPLETE, Checkpoints
from kdistill.config import DistillConfig
from kdistill.strategies import explicit
from kdistill.strategies.explicit import distill_explicit
from kdistill.errors import UserError
from kdistill.pipeline import run
from kdistill.training import (
    FastDropout,
    GroupStream,
    LengthGroupedSampler,
    LossNotFinite,
    make_loader,
    make_loaders,
    use_fast_dropout,
)
from tests.conftest import tiny_bert_config
from tests.helpers import (
    save_teacher_dir,
    tiny_pair,
    tiny_train,
    toy_encoded,
    toy_run_config,
    write_recipe,
    write_toy_csv,
)
from kdistill.strategies.phase import Phase

LENGTHS = [5 + (7 * i) % 11 for i in range(37)]


def batches(sampler) -> list[list[int]]:
    return [list(b) for b in sampler]


# ------------------------------------------------------------------------------------------- batches, shards

@pytest.mark.parametrize("world", [2, 3])
def test_processes_split_every_global_batch_into_contiguous_disjoint_shares(world):
    whole = batches(LengthGroupedSampler(LENGTHS, 8, seed=3, group=2))
    shares = [LengthGroupedSampler(LENGTHS, 8, seed=3, group=2, num_replicas=world, rank=r) for r in range(world)]
    per_process = [batches(s) for s in shares]
    kept = [b for b in whole if len(b) >= world]  # 37 = 4 * 8 + 5: the 5-row batch is kept
    assert kept == whole
    assert all(len(p) == len(kept) == len(s) for p, s in zip(per_process, shares))  # every process, every step
    for i, batch in enumerate(kept):
        assert sum((p[i] for p in per_process), []) == batch  # rank order, contiguous, nothing twice
        assert max(len(p[i]) for p in per_process) - min(len(p[i]) for p in per_process) <= 1


def test_a_training_batch_smaller_than_the_number_of_processes_is_dropped_an_evaluation_batch_is_not():
    lengths = LENGTHS[:17]  # 2 batches of 8 and one of 1
    train = [LengthGroupedSampler(lengths, 8, seed=0, num_replicas=2, rank=r) for r in range(2)]
    assert [len(batches(s)) for s in train] == [2, 2] and [len(s) for s in train] == [2, 2]
    evaluation = [LengthGroupedSampler(lengths, 8, seed=0, shuffle=False, num_replicas=2, rank=r) for r in range(2)]
    assert sorted(sum(sum((batches(s) for s in evaluation), []), [])) == list(range(17))


def test_a_resumed_epoch_skips_the_batches_done_and_only_once():
    sampler = LengthGroupedSampler(LENGTHS, 4, seed=1)
    sampler.set_epoch(2)
    full = batches(sampler)
    sampler.set_epoch(2, skip=3)
    sampler.set_epoch(2)  # accelerate calls set_epoch(epoch) again when it starts iterating: the skip stays
    assert batches(sampler) == full[3:]
    assert batches(sampler) == full  # the next pass over the epoch is whole again
    sampler.set_epoch(1)
    assert batches(sampler) != full  # another epoch, another order


def test_a_stream_sought_to_a_saved_position_continues_with_the_same_batches(toy_examples, tiny_tokenizer):
    from datasets import Dataset

    data = Dataset.from_dict(dict(tiny_tokenizer([r["text"] for r in toy_examples[:30]]), labels=[0] * 30))
    data = data.add_column("idx", list(range(30)))

    def stream():
        return GroupStream(make_loader(data, tiny_tokenizer, 4, seed=5, shuffle=True), grad_accum=2)

    def take(s, n):
        it = iter(s)
        return [[b["idx"].tolist() for b in next(it)] for _ in range(n)]

    reference = stream()
    assert reference.per_epoch == 4  # 8 batches of 4 (the last 2 rows), 2 a step
    expected = take(reference, 11)
    for done in (3, 4, 6):  # mid-epoch, an epoch's end, the next epoch
        first = stream()
        take(first, done)
        position = first.position
        assert position["batches_done"] == 2 * position["steps_done"] and position["epoch"] == done // 4
        resumed = stream()
        resumed.seek(position)
        assert take(resumed, 11 - done) == expected[done:]


def test_a_global_batch_too_small_to_share_is_a_user_error(toy_examples, tiny_tokenizer):
    from datasets import Dataset

    data = Dataset.from_dict(dict(tiny_tokenizer(["a b"] * 8), labels=[0] * 8))
    four = SimpleNamespace(num_processes=4, process_index=0)
    with pytest.raises(UserError, match="batch_size: 4 examples per step in micro-batches of 2"):
        make_loaders(data, data, tiny_tokenizer, tiny_train(batch_size=4, grad_accum=2), four)


# ------------------------------------------------------------------------------------------------ errors

def test_a_nan_loss_stops_the_run_naming_its_step_and_term_and_keeps_the_last_checkpoint(monkeypatch, tmp_path,
                                                                                        tiny_tokenizer):
    calls = []

    def nan_kd_at_step_3(*args, **kwargs):
        terms = compute_terms(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:  # one micro-batch a step: the third call is step 3
            kd_sum, kd_count = terms["kd"]
            terms["kd"] = (kd_sum * float("nan"), kd_count)
        return terms

    compute_terms = explicit.compute_terms
    monkeypatch.setattr(explicit, "compute_terms", nan_kd_at_step_3)
    teacher, student, spec = tiny_pair(tiny_tokenizer)
    with pytest.raises(LossNotFinite, match=r"loss is not finite at step 3 \(term: kd\)") as raised:
        distill_explicit(Phase(student=student, teachers=[teacher], tokenizer=tiny_tokenizer,
                               data=toy_encoded(tiny_tokenizer), spec=spec, distill=DistillConfig(),
                               train=tiny_train(max_steps=5), task="classification",
                               checkpoints=Checkpoints(tmp_path, every=2)))
    assert isinstance(raised.value, UserError)  # the CLI: one line, exit 2
    assert (tmp_path / "step-0000002" / COMPLETE).is_file()  # the last good checkpoint, to resume from
    assert Checkpoints(tmp_path, resume=True).latest() == tmp_path / "step-0000002"


def test_a_full_disk_while_saving_a_model_is_a_user_error_naming_the_run_dir(monkeypatch, tmp_path, teacher_dir):
    import kdistill.pipeline.encoder

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(kdistill.pipeline.encoder, "save_model", no_space)
    cfg = toy_run_config(tmp_path, teacher_dir, "explicit")
    message = re.escape(f"cannot write {tmp_path / 'run'}: No space left on device; ") + ".*start the run again"
    with pytest.raises(UserError, match=message) as refused:
        run(cfg, tmp_path / "run")
    assert "--resume" not in str(refused.value)  # the dir it would name is gone: nothing was saved in it
    assert not (tmp_path / "run").exists()


def kdistill_limited(*args, file_size: int | None = None) -> subprocess.CompletedProcess:
    def limit():  # files may grow to file_size bytes: a write past it fails with EFBIG, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size, file_size))

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "kdistill.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=300, preexec_fn=limit if file_size else None)


@pytest.fixture(scope="module")
def small_recipe(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("errors")
    return write_recipe(root / "toy.yaml", {
        "data": {"train_file": str(write_toy_csv(root / "toy.csv", 45)), "max_length": 16},
        "teacher": {"path": str(save_teacher_dir(root / "teacher", tiny_tokenizer))},
        "student": {"layers": 2},
        "distill": {"losses": {"kd": 1.0, "ce": 0.5}, "baseline": False},
        "train": {"max_steps": 4, "batch_size": 8, "checkpoint_every": 2},
        "eval": {"repeats": 1, "warmup": 0},
    })


def test_a_disk_that_fills_up_during_a_checkpoint_exits_2_naming_the_checkpoint(small_recipe, tmp_path):
    result = kdistill_limited("run", small_recipe, "--out", tmp_path / "run", file_size=60_000)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"kdistill: cannot write checkpoint {tmp_path / 'run' / 'checkpoints' / 'student'}")
    assert "File too large" in last
    assert not list((tmp_path / "run" / "checkpoints" / "student").iterdir())  # nothing half-written left


def test_a_run_dir_that_cannot_be_created_exits_2_naming_it(small_recipe, tmp_path, capsys):
    from kdistill.cli import main

    (tmp_path / "file").write_text("not a dir")
    with pytest.raises(SystemExit) as exited:
        main(["run", str(small_recipe), "--out", str(tmp_path / "file" / "run")])
    assert exited.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == f"kdistill: cannot write the run directory {tmp_path / 'file' / 'run'}: Not a directory"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only dirs")
def test_a_read_only_run_dir_exits_2_naming_it(small_recipe, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    run_dir.chmod(0o555)
    result = kdistill_limited("run", small_recipe, "--out", run_dir)
    run_dir.chmod(0o755)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last == f"kdistill: cannot write the run directory {run_dir}: Permission denied"



def test_early_stopping_keeps_the_best_weights_and_stops_after_patience():
    from kdistill.training import EarlyStopping

    model = torch.nn.Linear(2, 1)
    stopper = EarlyStopping(patience=2)
    evals = [{"accuracy": 0.5, "loss": 1.0}, {"accuracy": 0.7, "loss": 0.9}, {"accuracy": 0.7, "loss": 0.95},
             {"accuracy": 0.6, "loss": 0.8}]
    stops = []
    for i, metrics in enumerate(evals):
        with torch.no_grad():
            model.weight.fill_(float(i))
        stops.append(stopper.update(model, metrics))
    assert stops == [False, False, False, True]  # the tie on accuracy lost on loss: a bad evaluation
    stopper.restore_best(model)
    assert model.weight.eq(1.0).all()


def test_early_stopping_by_loss_for_language_models():
    from kdistill.training import EarlyStopping

    model = torch.nn.Linear(2, 1)
    stopper = EarlyStopping(patience=None, score=lambda m: (-m["loss"],))
    for i, loss in enumerate([3.0, 2.5, 2.7]):
        with torch.no_grad():
            model.weight.fill_(float(i))
        assert not stopper.update(model, {"loss": loss})  # no patience: never stops
    stopper.restore_best(model)
    assert model.weight.eq(1.0).all()


def test_ce_over_unlabeled_rows_is_normalised_by_the_labeled_rows_of_the_whole_step():
    from kdistill.data import UNLABELED
    from kdistill.terms import step_loss
    from kdistill.losses import hard_ce
    from kdistill.training import batch_units

    torch.manual_seed(0)
    logits = torch.randn(6, 3)
    labels = torch.tensor([0, UNLABELED, UNLABELED, UNLABELED, 2, 1])  # 3 labeled rows of 6
    mask = torch.ones(6, 4, dtype=torch.long)
    whole = {"attention_mask": mask, "labels": labels}
    halves = [{"attention_mask": mask[i:i + 3], "labels": labels[i:i + 3]} for i in (0, 3)]
    step = {k: sum(batch_units(b)[k] for b in halves) for k in ("rows", "labeled", "tokens")}
    assert step["labeled"] == 3

    one = step_loss({"ce": hard_ce(logits, labels)}, {"ce": 1.0}, batch_units(whole), batch_units(whole), 1, {},
                    task="classification")
    accumulated = sum(step_loss({"ce": hard_ce(logits[i:i + 3], labels[i:i + 3])}, {"ce": 1.0}, batch_units(b),
                                step, 1, {}, task="classification") for i, b in zip((0, 3), halves))
    expected = torch.nn.functional.cross_entropy(logits[[0, 4, 5]], labels[[0, 4, 5]])
    torch.testing.assert_close(one, expected)
    torch.testing.assert_close(accumulated, expected)  # 1 + 2 labeled rows: not the mean of the halves' means

    unlabeled = {"attention_mask": mask[1:4], "labels": labels[1:4]}
    alone = step_loss({"ce": hard_ce(logits[1:4], labels[1:4])}, {"ce": 1.0}, batch_units(unlabeled),
                      batch_units(unlabeled), 1, {}, task="classification")
    assert alone.item() == 0.0  # a micro-batch with no label adds nothing, and no NaN


def test_a_run_with_few_labels_distils_on_the_unlabeled_rest(tmp_path, teacher_dir):
    cfg = toy_run_config(tmp_path, teacher_dir, "explicit")
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"labeled_limit": 8}),
                                 "distill": cfg.distill.model_copy(update={"baseline": True})})
    run_dir = run(cfg, tmp_path / "run")
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["data"]["unlabeled_train"] > 8
    for name in ("student", "baseline"):
        steps = json.loads((run_dir / "logs" / f"history_{name}.json").read_text(encoding="utf-8"))["steps"]
        assert steps and all(torch.isfinite(torch.tensor(s["loss"])) for s in steps)


# ------------------------------------------------------------------------------------------- FastDropout

def test_fast_dropout_keeps_each_element_with_probability_one_minus_p_and_rescales_the_kept():
    torch.manual_seed(0)
    n, p = 1_000_003, 0.1  # an odd count: the last 63-bit draw is only partly used
    y = FastDropout(p)(torch.ones(n))
    kept = y != 0
    # a binomial count: 5 standard deviations of the kept fraction, sqrt(p (1 - p) / n) ~ 3e-4
    assert abs(kept.float().mean().item() - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5
    dropped = round(p * 32768)  # p in steps of 2^-15
    assert torch.equal(y[kept], torch.full((int(kept.sum()),), 32768 / (32768 - dropped)))


def test_fast_dropout_is_the_identity_in_eval_mode_and_at_p_0_and_repeats_under_a_seed():
    x = torch.randn(3, 5, 7)
    assert FastDropout(0.5).eval()(x) is x
    assert FastDropout(0.0)(x) is x
    masks = []
    for _ in range(2):
        torch.manual_seed(7)
        masks.append(FastDropout(0.5)(torch.ones(3, 5, 7)))
    assert torch.equal(*masks)
    assert 0 < (masks[0] == 0).sum() < masks[0].numel()


def test_fast_dropout_passes_the_gradient_through_the_kept_elements_only():
    torch.manual_seed(0)
    x = torch.randn(4, 33, requires_grad=True)
    y = FastDropout(0.3)(x)
    y.sum().backward()
    scale = 32768 / (32768 - round(0.3 * 32768))
    assert torch.equal(x.grad, (y != 0).float() * scale)


def test_use_fast_dropout_swaps_every_dropout_layer_and_leaves_eval_outputs_unchanged(tiny_tokenizer):
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config(tiny_tokenizer)).eval()
    ids = torch.tensor([[2, 5, 6, 7, 3]])
    before = model(input_ids=ids).logits
    layers = [m for m in model.modules() if type(m) is torch.nn.Dropout]
    assert use_fast_dropout(model) == len(layers) > 0
    assert not any(type(m) is torch.nn.Dropout for m in model.modules())
    # the attention module reads its dropout layer's p for scaled_dot_product_attention: it must survive the swap
    assert {m.p for m in model.modules() if isinstance(m, FastDropout)} == {layer.p for layer in layers}
    assert torch.equal(model(input_ids=ids).logits, before)
