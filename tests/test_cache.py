"""Teacher signal (kdistill/cache.py): Parquet shards + manifest round trip, stale-key rejection, atomic shards and
resume of a killed build, reading through fsspec URLs, reuse, and 2 processes writing what 1 writes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from kdistill.cache import (
    MANIFEST,
    build_topk_cache,
    cache_key,
    fingerprint_model,
    fingerprint_tokens,
    key_dir,
    open_teacher_signal,
    shard_name,
    write_teacher_signal,
)

N, L, K, V = 10, 5, 4, 50
SHARD = 3  # 10 blocks: shards of 3, 3, 3 and 1
FP16 = {"rtol": 2.0 ** -11, "atol": 1e-6}  # float16 storage: 11 significant bits, round to nearest


def _random_topk(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, L, V, generator=g) * 3
    return torch.log_softmax(logits, -1).topk(K, dim=-1)


def _key(**over):
    base = {"teacher": "t0", "data": "d0", "block_size": L, "k": K}
    return cache_key(**{**base, **over})


def _write(path, key, values, ids, fail_at: int | None = None, calls: list | None = None):
    def fill(a, b):
        if fail_at is not None and a >= fail_at:
            raise RuntimeError("teacher crashed")
        if calls is not None:
            calls.append((a, b))
        return values[a:b], ids[a:b]

    return write_teacher_signal(path, key, (N, L), fill, shard_blocks=SHARD, batch_size=2)


def _files(path):
    return sorted(os.listdir(path))


def test_round_trip_is_exact_up_to_float16_and_loads_a_shard_when_first_needed(tmp_path):
    values, ids = _random_topk()
    path = key_dir(tmp_path, _key())
    written = _write(path, _key(), values, ids)
    assert not written.reused
    assert _files(path) == [MANIFEST] + [shard_name(s) for s in range(4)]
    signal = open_teacher_signal(path, _key())
    assert signal is not None and len(signal) == N and signal.k == K and not signal.loaded
    rows = torch.tensor([1, 0, 1, 2])  # any order, repeats allowed; all in shard 0
    lp, ix = signal.lookup(rows)
    assert set(signal.loaded) == {0}  # only the shard the rows are in was read
    assert lp.dtype == torch.float32 and ix.dtype == torch.int64 and lp.shape == (4, L, K)
    assert torch.equal(ix, ids[rows])
    torch.testing.assert_close(lp, values[rows], **FP16)
    rows = torch.tensor([9, 4, 0, 7, 3])  # across shards
    lp, ix = signal.lookup(rows)
    assert set(signal.loaded) == {0, 1, 2, 3}
    assert torch.equal(ix, ids[rows])
    torch.testing.assert_close(lp, values[rows], **FP16)
    with pytest.raises(IndexError, match="block 10 outside 0..9"):
        signal.lookup([3, 10])
    with pytest.raises(IndexError, match="block -1 outside"):
        signal.lookup([-1])

    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["key"] == _key() and manifest["num_blocks"] == N and manifest["shard_blocks"] == SHARD
    assert manifest["shards"] == [{"file": shard_name(s), "first_block": 3 * s, "num_blocks": n, "rows": n}
                                  for s, n in enumerate([3, 3, 3, 1])]


def test_shards_are_plain_parquet_that_pyarrow_and_datasets_read(tmp_path):
    from datasets import Dataset

    values, ids = _random_topk()
    path = tmp_path / "signal"
    _write(path, _key(), values, ids)
    table = pq.read_table(path / shard_name(1))
    assert table.schema.field("block").type == pa.int64()
    assert table.schema.field("ids").type.value_type == pa.int32()
    assert table.schema.field("logprobs").type.value_type == pa.float16()  # Parquet keeps float16
    assert table["block"].to_pylist() == [3, 4, 5]
    stored = np.asarray(table["logprobs"].to_pylist(), dtype=np.float32).reshape(3, L, K)
    torch.testing.assert_close(torch.from_numpy(stored), values[3:6], **FP16)
    ds = Dataset.from_parquet(str(path / "shard-*.parquet"), cache_dir=str(tmp_path / "hf"))
    assert ds["block"] == list(range(N))
    assert ds[9]["ids"] == ids[9].reshape(-1).tolist()


@pytest.mark.parametrize("change", [{"teacher": "t1"}, {"data": "d1"}, {"k": K + 1}, {"block_size": L + 1}])
def test_a_signal_is_never_used_for_another_key(tmp_path, change):
    values, ids = _random_topk()
    _write(key_dir(tmp_path, _key()), _key(), values, ids)
    assert open_teacher_signal(key_dir(tmp_path, _key()), _key(**change)) is None  # the same dir, asked for another
    assert open_teacher_signal(key_dir(tmp_path, _key(**change)), _key(**change)) is None


def test_a_signal_whose_manifest_or_shards_disagree_is_rejected(tmp_path):
    values, ids = _random_topk()
    path = tmp_path / "signal"
    _write(path, _key(), values, ids)
    manifest_file = path / MANIFEST
    manifest = json.loads(manifest_file.read_text())
    manifest_file.write_text(json.dumps({**manifest, "key": _key(teacher="someone-else")}))
    assert open_teacher_signal(path, _key()) is None
    manifest_file.write_text(json.dumps({**manifest, "key": {**_key(), "format": 1}}))
    assert open_teacher_signal(path, None) is None  # an older format, even when any key would do
    manifest_file.write_text(json.dumps({**manifest, "num_blocks": N + 1}))  # shards shorter than it promises
    assert open_teacher_signal(path, _key()) is None
    manifest_file.write_text("{not json")
    assert open_teacher_signal(path, _key()) is None
    manifest_file.write_text(json.dumps(manifest))
    assert open_teacher_signal(path, _key()) is not None
    shutil.copy(path / shard_name(0), path / shard_name(1))  # a shard holding other blocks than listed
    signal = open_teacher_signal(path, _key())
    signal.lookup([0])
    with pytest.raises(ValueError, match=r"shard-00001.parquet: its metadata .* disagrees with the manifest"):
        signal.lookup([4])
    (path / shard_name(3)).unlink()
    assert open_teacher_signal(path, _key()) is None


def test_a_killed_build_keeps_its_complete_shards_and_the_rerun_computes_only_the_rest(tmp_path):
    values, ids = _random_topk()
    path = tmp_path / "signal"
    with pytest.raises(RuntimeError, match="teacher crashed"):
        _write(path, _key(), values, ids, fail_at=5)  # shard 1 (blocks 3..5): its first batch ran, the second fails
    assert _files(path) == [shard_name(0)]  # no manifest, no temp file
    assert open_teacher_signal(path, _key()) is None
    (path / f".{shard_name(2)}.0badcafe.tmp").write_bytes(b"PAR1...")  # what a SIGKILL mid-write leaves
    (path / shard_name(3)).write_bytes(b"not parquet")  # a damaged shard is not complete
    (path / "notes.txt").write_text("mine")  # not ours: kept

    calls = []
    resumed = _write(path, _key(), values, ids, calls=calls)
    assert calls == [(3, 5), (5, 6), (6, 8), (8, 9), (9, 10)]  # shard 0 was not computed again
    assert not resumed.reused
    assert _files(path) == [MANIFEST, "notes.txt"] + [shard_name(s) for s in range(4)]
    whole = _write(tmp_path / "uninterrupted", _key(), values, ids)
    for a, b in zip(resumed.lookup(torch.arange(N)), whole.lookup(torch.arange(N))):
        assert torch.equal(a, b)  # the same function on the same batches: the same bits

    calls.clear()
    again = _write(path, _key(), values, ids, calls=calls)
    assert again.reused and not calls


def test_a_failed_build_of_one_key_leaves_the_signal_of_another_untouched(tmp_path):
    values, ids = _random_topk()
    good = _write(key_dir(tmp_path, _key()), _key(), values, ids)
    with pytest.raises(RuntimeError):
        _write(key_dir(tmp_path, _key(data="d2")), _key(data="d2"), values, ids, fail_at=0)
    assert open_teacher_signal(key_dir(tmp_path, _key()), _key()) is not None
    assert _files(good.path) == [MANIFEST] + [shard_name(s) for s in range(4)]
    assert _files(key_dir(tmp_path, _key(data="d2"))) == []


def test_wrong_fill_shapes_are_refused(tmp_path):
    values, ids = _random_topk()
    with pytest.raises(ValueError, match="expected"):
        write_teacher_signal(tmp_path / "s", _key(), (N, L), lambda a, b: (values[a:b, :, :2], ids[a:b, :, :2]))
    assert _files(tmp_path / "s") == []


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_a_signal_read_through_an_fsspec_url_gives_the_same_lookups(tmp_path, scheme):
    values, ids = _random_topk()
    local = _write(tmp_path / "signal", _key(), values, ids)
    if scheme == "memory":
        fs = fsspec.filesystem("memory")
        url = f"memory://kdistill-test-{os.getpid()}/signal"
        for name in _files(tmp_path / "signal"):
            fs.pipe(f"{url}/{name}", (tmp_path / "signal" / name).read_bytes())
    else:
        url = (tmp_path / "signal").as_uri()
    try:
        remote = open_teacher_signal(url, _key())
        assert remote is not None and remote.path == url
        assert open_teacher_signal(url) is not None  # no key: whatever it holds
        rows = torch.tensor([9, 2, 5, 2, 0])
        for a, b in zip(remote.lookup(rows), local.lookup(rows)):
            assert torch.equal(a, b)
        assert open_teacher_signal(url, _key(k=K + 1)) is None
    finally:
        if scheme == "memory":
            fs.rm(url.split("/signal")[0], recursive=True)


def _tiny_lm(seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                      bos_token_id=0, eos_token_id=0)).eval()


def test_build_runs_the_teacher_once_and_rebuilds_for_new_weights_or_data(tmp_path):
    teacher = _tiny_lm(0)
    calls = []
    teacher.register_forward_hook(lambda *a: calls.append(1))
    ids = torch.randint(0, V, (N, L), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    first = build_topk_cache(teacher, ids, mask, k=K, root=tmp_path, batch_size=4, shard_blocks=6)
    assert len(calls) == 3 and not first.reused  # shards of 6 and 4 blocks, batches of 4: (4, 2) and (4)
    with torch.no_grad():
        expected = torch.log_softmax(teacher(input_ids=ids).logits, -1).topk(K, dim=-1)
    lp, ix = first.lookup(torch.arange(N))
    assert torch.equal(ix, expected.indices)
    torch.testing.assert_close(lp, expected.values, rtol=2e-3, atol=2e-3)  # float16, and other batch sizes

    calls.clear()
    again = build_topk_cache(teacher, ids, mask, k=K, root=tmp_path)
    assert again.reused and again.path == first.path and not calls  # the teacher did not run

    with torch.no_grad():
        next(teacher.parameters()).add_(0.01)  # "fine-tuned" teacher: new fingerprint, new signal
    third = build_topk_cache(teacher, ids, mask, k=K, root=tmp_path)
    assert not third.reused and third.path != first.path
    fourth = build_topk_cache(teacher, ids.flip(0), mask, k=K, root=tmp_path)  # same tokens, other order
    assert not fourth.reused and fourth.path not in (first.path, third.path)


def test_fingerprints_see_weights_and_tokens():
    a, b = _tiny_lm(0), _tiny_lm(1)
    assert fingerprint_model(a) == fingerprint_model(_tiny_lm(0)) != fingerprint_model(b)
    ids = torch.arange(10).view(2, 5)
    mask = torch.ones_like(ids)
    assert fingerprint_tokens(ids, mask) != fingerprint_tokens(ids.flip(1), mask)
    mask2 = mask.clone()
    mask2[1, -1] = 0
    assert fingerprint_tokens(ids, mask) != fingerprint_tokens(ids, mask2)


# The script each process runs: builds the signal of a seeded tiny teacher, records which blocks its teacher scored,
# and saves what it reads back of every block.
BUILD_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np, torch
    from kdistill.cache import build_topk_cache
    from kdistill.training import process_state
    from tests.test_cache import N, L, K, V, _tiny_lm

    root, out = sys.argv[1], sys.argv[2]
    teacher = _tiny_lm(0)
    ids = torch.randint(0, V, (N, L), generator=torch.Generator().manual_seed(1))
    scored = []
    teacher.register_forward_pre_hook(
        lambda m, args, kwargs: scored.extend(int((ids == row).all(1).nonzero()[0]) for row in kwargs["input_ids"]),
        with_kwargs=True)
    signal = build_topk_cache(teacher, ids, torch.ones_like(ids), k=K, root=root, batch_size=2, shard_blocks=3)
    rank = process_state().process_index
    lp, ix = signal.lookup(torch.arange(N))
    np.savez(f"{out}-rank{rank}.npz", logprobs=lp.numpy(), ids=ix.numpy())
    # a file per rank: two processes printing to one pipe can interleave their lines
    with open(f"{out}-rank{rank}.json", "w") as f:
        json.dump({"scored": scored, "path": str(signal.path), "reused": signal.reused}, f)
    if torch.distributed.is_initialized():  # exit with no gloo thread left running (else an abort, now and then)
        torch.distributed.destroy_process_group()
""")


@pytest.mark.slow
def test_two_processes_write_the_rows_one_process_writes(tmp_path):
    script = tmp_path / "build_signal.py"
    script.write_text(BUILD_SCRIPT, encoding="utf-8")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    two = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", str(script), str(tmp_path / "two"),
                          str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=600)
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one"), str(tmp_path / "one")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert one.returncode == 0, one.stderr[-3000:]
    reports = {rank: json.loads((tmp_path / f"two-rank{rank}.json").read_text()) for rank in (0, 1)}
    solo = json.loads((tmp_path / "one-rank0.json").read_text())
    # 4 shards of 3, 3, 3, 1 blocks: rank 0 scores shards 0 and 2, rank 1 shards 1 and 3; one process all of them
    assert sorted(reports[0]["scored"]) == [0, 1, 2, 6, 7, 8]
    assert sorted(reports[1]["scored"]) == [3, 4, 5, 9]
    assert sorted(solo["scored"]) == list(range(N))
    assert reports[0]["path"] == reports[1]["path"] and not reports[0]["reused"] and not reports[1]["reused"]
    assert sorted(os.listdir(reports[0]["path"])) == [MANIFEST] + [shard_name(s) for s in range(4)]
    assert os.path.basename(reports[0]["path"]) == os.path.basename(solo["path"])  # the same key
    assert (json.loads(open(os.path.join(reports[0]["path"], MANIFEST)).read())
            == json.loads(open(os.path.join(solo["path"], MANIFEST)).read()))
    single = np.load(tmp_path / "one-rank0.npz")
    for rank in (0, 1):  # both processes read the whole signal; each block as one process computed it
        both = np.load(tmp_path / f"two-rank{rank}.npz")
        assert np.array_equal(both["ids"], single["ids"])
        # (the same batches through the same kernels; float16 tolerance in case another machine's kernels differ
        # between a process with one peer and one alone)
        torch.testing.assert_close(torch.from_numpy(both["logprobs"]), torch.from_numpy(single["logprobs"]),
                                   **FP16)
