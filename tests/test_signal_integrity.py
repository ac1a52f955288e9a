"""A teacher signal is checked before it is trusted: every shard's Parquet footer (metadata, row count, column types,
id statistics) and the manifest's vocab_size before a run claims its dir, each shard's sha256 and values (ids in
[0, vocab), finite log-probs) on its first read. A damaged signal is a one-line error (exit 2) naming the shard,
the run dir is left as it was, and the rerun with a good signal succeeds."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from kdistill.cache import MANIFEST, SignalError, cache_key, open_teacher_signal, shard_name, write_teacher_signal
from kdistill.cli import main
from kdistill.errors import UserError
from kdistill.tasks.causal_lm import open_prebuilt_signal
from kdistill.training import LossNotFinite, check_finite
from tests.conftest import tiny_gpt2
from tests.helpers import write_lm_recipe

N, L, K, V = 10, 5, 4, 50
SHARD = 3  # 10 blocks: shards of 3, 3, 3 and 1
KEY = cache_key(teacher="t0", data="d0", block_size=L, k=K)


def _topk(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(N, L, V, generator=g) * 3, -1).topk(K, dim=-1)


def _signal(path: Path, values=None, ids=None, vocab: int | None = V):
    top = _topk()
    values = top.values if values is None else values
    ids = top.indices if ids is None else ids
    return write_teacher_signal(path, KEY, (N, L), lambda a, b: (values[a:b], ids[a:b]), shard_blocks=SHARD,
                                batch_size=2, vocab=vocab)


def _rewrite(signal_dir: Path, name: str, change, *, statistics: bool = True) -> None:
    """Rewrite shard `name` with change(column name, (rows, n) numpy array) -> array, keeping its schema and
    metadata, and its manifest checksum in step (a consistent signal with bad values, as a buggy writer makes)."""
    file = signal_dir / name
    table = pq.read_table(file)
    columns = {}
    for field in table.schema:
        column = table[field.name].combine_chunks()
        if pa.types.is_fixed_size_list(field.type):
            flat = change(field.name, column.flatten().to_numpy().reshape(len(table), -1).copy())
            column = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), field.type.value_type),
                                                       field.type.list_size)
        columns[field.name] = column
    pq.write_table(pa.table(columns).replace_schema_metadata(table.schema.metadata), file, compression="zstd",
                   write_statistics=statistics)
    manifest = json.loads((signal_dir / MANIFEST).read_text())
    if "sha256" in manifest:
        manifest["sha256"][name] = hashlib.sha256(file.read_bytes()).hexdigest()
    (signal_dir / MANIFEST).write_text(json.dumps(manifest))


def _truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def _flip(file: Path) -> None:
    """Invert 16 bytes in the middle of the shard's data pages (between the leading magic and the footer)."""
    data = bytearray(file.read_bytes())
    footer = int.from_bytes(data[-8:-4], "little") + 8
    middle = (4 + len(data) - footer) // 2
    data[middle: middle + 16] = bytes(b ^ 0xFF for b in data[middle: middle + 16])
    file.write_bytes(bytes(data))


# ------------------------------------------------------------------------------------------ the signal itself

def test_the_manifest_declares_each_shards_sha256_and_the_vocabulary(tmp_path):
    _signal(tmp_path / "s")
    manifest = json.loads((tmp_path / "s" / MANIFEST).read_text())
    assert manifest["vocab_size"] == V
    assert manifest["sha256"] == {shard_name(s): hashlib.sha256((tmp_path / "s" / shard_name(s)).read_bytes())
                                  .hexdigest() for s in range(4)}
    signal = open_teacher_signal(tmp_path / "s", KEY)
    signal.verify(V)  # a good signal passes
    assert signal.vocab_size == V and not signal.loaded  # footers only: no shard was decoded


def test_a_truncated_shard_is_found_from_its_footer(tmp_path):
    _signal(tmp_path / "s")
    _truncate(tmp_path / "s" / shard_name(2))
    with pytest.raises(SignalError, match=r"s/shard-00002\.parquet: not a readable Parquet file \(.*\); it is "
                                          r"truncated or damaged") as err:
        open_teacher_signal(tmp_path / "s", KEY).verify(V)
    assert "\n" not in str(err.value)


def test_flipped_bytes_are_a_checksum_mismatch_on_the_shards_first_read(tmp_path):
    _signal(tmp_path / "s")
    _flip(tmp_path / "s" / shard_name(1))
    signal = open_teacher_signal(tmp_path / "s", KEY)
    signal.verify(V)  # the footer is intact
    signal.lookup([0, 9])  # other shards read fine
    with pytest.raises(SignalError, match=r"shard-00001\.parquet: sha256 [0-9a-f]{16}\.\.\. of its \d+ bytes "
                                          r"differs from the manifest's"):
        signal.lookup([4])
    assert 1 not in signal.loaded


def test_ids_outside_the_vocabulary_are_found_in_the_footer_statistics_or_on_first_read(tmp_path):
    _signal(tmp_path / "s")

    def bad_id(name, values):
        if name == "ids":
            values[1, 2 * K + 3] = 2_000_000_000  # block 4 (row 1 of shard 1), position 2, rank 3
        return values

    _rewrite(tmp_path / "s", shard_name(1), bad_id)
    with pytest.raises(SignalError, match=r"shard-00001\.parquet: its ids span \d+\.\.2000000000 \(footer "
                                          r"statistics\), outside the vocabulary \[0, 50\)"):
        open_teacher_signal(tmp_path / "s", KEY).verify()
    _rewrite(tmp_path / "s", shard_name(1), lambda name, values: values, statistics=False)  # a writer without them
    signal = open_teacher_signal(tmp_path / "s", KEY)
    signal.verify()
    with pytest.raises(SignalError, match=r"shard-00001\.parquet: block 4 \(row 1\) holds token id 2000000000 at "
                                          r"position 2, rank 3: outside the vocabulary \[0, 50\)"):
        signal.lookup([3, 4])


def test_non_finite_log_probs_are_found_on_first_read_naming_the_first_bad_block(tmp_path):
    values, ids = _topk()
    values = values.clone()
    values[7, 1, 0] = float("nan")
    values[8] = float("inf")
    signal = _signal(tmp_path / "s", values, ids)
    signal.lookup([0, 1, 2])
    with pytest.raises(SignalError, match=r"shard-00002\.parquet: block 7 \(row 1\) holds log-prob nan at position "
                                          r"1, rank 0: not a finite log-probability .*\(21 such values in the shard\)"):
        signal.lookup([6])


def test_footer_checks_compare_column_types_rows_and_vocabulary_with_the_manifest_and_key(tmp_path):
    _signal(tmp_path / "s")
    with pytest.raises(SignalError, match=r"manifest\.json declares a vocabulary of 50 tokens, this run's teacher "
                                          r"scores 51"):
        open_teacher_signal(tmp_path / "s", KEY).verify(51)
    table = pq.read_table(tmp_path / "s" / shard_name(3))
    wide = table.set_column(table.schema.get_field_index("logprobs"), "logprobs", pa.FixedSizeListArray.from_arrays(
        pa.array(np.zeros(L * K, np.float32)), L * K))
    pq.write_table(wide.replace_schema_metadata(table.schema.metadata), tmp_path / "s" / shard_name(3))
    with pytest.raises(SignalError, match=r"shard-00003\.parquet: column logprobs is fixed_size_list<.*float>\[20\], "
                                          r"expected fixed_size_list<halffloat>\[20\]"):
        open_teacher_signal(tmp_path / "s", KEY).verify(V)


def test_a_manifest_from_before_checksums_is_read_with_the_footer_and_value_checks(tmp_path):
    _signal(tmp_path / "s")
    manifest = json.loads((tmp_path / "s" / MANIFEST).read_text())
    del manifest["sha256"], manifest["vocab_size"]
    (tmp_path / "s" / MANIFEST).write_text(json.dumps(manifest))
    old = open_prebuilt_signal(str(tmp_path / "s"), KEY, V)  # the run's teacher says the vocabulary
    assert old.vocab_size == V and not old.checksums
    lp, ix = old.lookup(range(N))
    assert torch.equal(ix, _topk().indices)
    _truncate(tmp_path / "s" / shard_name(0))
    with pytest.raises(UserError, match=r"^distill\.teacher_signal: .*/s/shard-00000\.parquet: not a readable "
                                        r"Parquet file"):
        open_prebuilt_signal(str(tmp_path / "s"), KEY, V)


def test_a_non_finite_loss_says_what_is_true_at_the_first_step_and_later():
    with pytest.raises(LossNotFinite) as first:
        check_finite(torch.tensor(float("nan")), 1, {"forward_kl": float("nan"), "lm": 2.0})
    message = str(first.value)
    assert message.startswith("loss is not finite at step 1 (term: forward_kl), before any weight update, so not "
                              "train.lr")
    assert "teacher signal" in message and "no checkpoint of this phase was saved" in message
    assert "lower train.lr" not in message and "last good checkpoint is kept" not in message
    with pytest.raises(LossNotFinite) as later:
        check_finite(torch.tensor(float("inf")), 7, {"lm": float("inf")})
    assert "lower train.lr" in str(later.value) and "if any, are kept" in str(later.value)


# ------------------------------------------------------------------------------------------------- the CLI

def _corrupt_truncated(signal_dir):
    _truncate(signal_dir / shard_name(0))


def _corrupt_flipped(signal_dir):
    _flip(signal_dir / shard_name(0))


def _corrupt_id_beyond_vocab(signal_dir, statistics=True):
    def bad(name, values):
        if name == "ids":
            values[0, 5] = 2_000_000_000
        return values
    _rewrite(signal_dir, shard_name(0), bad, statistics=statistics)


def _corrupt_all_nan(signal_dir):
    for file in sorted(signal_dir.glob("shard-*.parquet")):
        _rewrite(signal_dir, file.name, lambda name, values: np.full_like(values, np.nan) if name == "logprobs"
                 else values)


CORRUPTIONS = [
    (_corrupt_truncated, r"not a readable Parquet file \(.*\); it is truncated or damaged"),
    (_corrupt_flipped, r"sha256 [0-9a-f]{16}\.\.\. of its \d+ bytes differs from the manifest's"),
    (_corrupt_id_beyond_vocab, r"its ids span \d+\.\.2000000000 \(footer statistics\), outside the vocabulary"),
    (lambda d: _corrupt_id_beyond_vocab(d, statistics=False),
     r"block 0 \(row 0\) holds token id 2000000000 at position 1, rank 1: outside the vocabulary"),
    (_corrupt_all_nan, r"block \d+ \(row \d+\) holds log-prob nan at position 0, rank 0: not a finite"),
]


def test_a_damaged_signal_stops_the_run_with_exit_2_naming_the_shard_and_leaves_no_run_dir(
        tmp_path, monkeypatch, bpe_tokenizer, docs, capsys):
    recipe = write_lm_recipe(
        tmp_path, tiny_gpt2(bpe_tokenizer), bpe_tokenizer, docs, name="tiny-lm", block_size=32,
        student={"layers": 2},
        distill={"temperature": 2.0, "losses": {"forward_kl": 1.0, "lm": 0.5}, "cache_top_k": 4,
                 "baseline": False},
        train={"max_steps": 2, "batch_size": 4, "lr": 1.0e-3},
        eval={"repeats": 1, "warmup": 0, "throughput_batch_size": 2},
    )
    monkeypatch.setenv("KDISTILL_CACHE_DIR", str(tmp_path / "cache"))
    good = tmp_path / "good"
    main(["teacher-signal", str(recipe), "--out", str(good)])
    assert json.loads((good / MANIFEST).read_text())["vocab_size"] == len(bpe_tokenizer)
    out = tmp_path / "runs" / "run"
    for n, (corrupt, what) in enumerate(CORRUPTIONS):
        bad = tmp_path / f"bad-{n}"
        shutil.copytree(good, bad)
        corrupt(bad)
        with pytest.raises(SystemExit) as exc:
            main(["run", str(recipe), "--out", str(out), "--set", f"distill.teacher_signal={bad}"])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert exc.value.code == 2, (corrupt, err)
        assert f"{bad}/shard-0000" in err and "internal error" not in err, err
        assert re.search(what, err), (what, err)
        assert not out.exists() and not out.parent.exists()  # nothing left: neither the run dir nor its parent
    main(["run", str(recipe), "--out", str(out), "--set", f"distill.teacher_signal={good}"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["teacher_cache"]["status"] == "prebuilt"
    assert not (tmp_path / "cache" / "teacher-topk").exists()  # the teacher never scored the training set itself
