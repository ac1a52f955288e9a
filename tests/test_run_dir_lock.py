"""Claiming a run dir is atomic: of several runs started at the same moment into one --out, exactly one proceeds
and the others exit 2 with one line naming the dir; the dir then holds the survivor's run alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import yaml

from kdistill.errors import UserError
from kdistill.rundir import LOCK, claim_run_dir
from tests.helpers import given_teacher_recipe

PROCESSES = 4
ROUNDS = 3

# Each process imports kdistill once (seconds), then for every round: says it is ready, waits for the round's go
# file, and runs the CLI; the runs of a round leave the barrier within a millisecond of each other.
STARTER = """
import logging, os, sys, time
from pathlib import Path
import kdistill.cli, kdistill.pipeline
logging.basicConfig(level="WARNING", stream=sys.__stderr__)  # the log stays in the process's own stderr
work, me, rounds, argv = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4:]
for r in range(rounds):
    sys.stderr = open(work / f"err-{r}-{me}", "w")
    (work / f"ready-{r}-{me}").write_text(str(os.getpid()))
    while not (work / f"go-{r}").exists():
        time.sleep(0.0005)
    try:
        kdistill.cli.main([a.replace("ROUND", str(r)) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    sys.stderr.close()
    (work / f"code-{r}-{me}").write_text(str(code))
"""


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, tiny_tokenizer):
    return given_teacher_recipe(tmp_path_factory.mktemp("lock"), tiny_tokenizer, {"kd": 1.0, "ce": 0.5})


def test_of_runs_started_together_into_one_dir_exactly_one_proceeds(recipe, tmp_path):
    """PROCESSES runs into one new dir (its parents missing too: all race to create them), ROUNDS times; each run
    is told apart by its name and its kd weight, which config.yaml, metrics.json and the student keep."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    logs = [open(tmp_path / f"log-{i}", "wb") for i in range(PROCESSES)]
    procs = [subprocess.Popen([sys.executable, "-c", STARTER, str(tmp_path), str(i), str(ROUNDS), "run", str(recipe),
                               "--out", str(tmp_path / "ROUND" / "runs" / "shared"), "--set", f"name=p{i}",
                               "--set", f"distill.losses.kd={i + 1}"],
                              env=env, stdout=logs[i], stderr=subprocess.STDOUT)
             for i in range(PROCESSES)]
    try:
        outcomes = [play_round(tmp_path, r, procs) for r in range(ROUNDS)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for log in logs:
            log.close()
    assert all(sorted(codes) == [0] + [2] * (PROCESSES - 1) for codes in outcomes), outcomes


def play_round(work, r: int, procs: list[subprocess.Popen]) -> list[int]:
    deadline = time.monotonic() + 300
    while not all((work / f"ready-{r}-{i}").exists() for i in range(PROCESSES)):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), \
            [(work / f"log-{i}").read_text()[-2000:] for i, p in enumerate(procs) if p.poll() is not None]
        time.sleep(0.02)
    (work / f"go-{r}").touch()
    while not all((work / f"code-{r}-{i}").exists() for i in range(PROCESSES)):
        assert time.monotonic() < deadline and all(p.poll() is None or p.returncode == 0 for p in procs)
        time.sleep(0.05)
    codes = [int((work / f"code-{r}-{i}").read_text()) for i in range(PROCESSES)]
    errors = [(work / f"err-{r}-{i}").read_text() for i in range(PROCESSES)]
    out = work / str(r) / "runs" / "shared"
    assert codes.count(0) == 1 and codes.count(2) == PROCESSES - 1, (r, codes, [e[-2000:] for e in errors])
    winner = codes.index(0)
    for i, err in enumerate(errors):
        if i != winner:  # one line naming the dir
            lines = [line for line in err.splitlines() if line.startswith("kdistill: ")]
            assert len(lines) == 1 and str(out) in lines[0] and "Traceback" not in err, err[-2000:]
    config = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))
    assert config["name"] == f"p{winner}" and config["distill"]["losses"]["kd"] == winner + 1
    assert json.loads((out / "metrics.json").read_text(encoding="utf-8"))["run"] == f"p{winner}"
    student = json.loads((out / "student" / "kdistill.json").read_text(encoding="utf-8"))
    assert student["losses"]["kd"] == winner + 1
    events = list((out / "logs").rglob("events.out.tfevents.*"))
    pid = (work / f"ready-{r}-{winner}").read_text()
    assert events and {f.name.split(".")[-2] for f in events} == {pid}, sorted(f.name for f in events)
    assert not (out / LOCK).exists()  # released with the run
    assert not [p.name for p in out.rglob(".*.tmp")]
    return codes


def test_a_claimed_dir_is_refused_to_a_second_claim_and_free_once_released(tmp_path):
    out = tmp_path / "run"
    with claim_run_dir(out):
        assert (out / LOCK).is_file()
        with pytest.raises(UserError, match=rf"^--out {out}: another kdistill process .* is using it"):
            with claim_run_dir(out):
                pass
        assert (out / LOCK).is_file()  # the refused claim left the holder's lock alone
    assert not (out / LOCK).exists()
    with claim_run_dir(out):  # free again
        pass
