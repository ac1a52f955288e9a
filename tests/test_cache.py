"""Teacher top-k cache: write / memory-mapped read round trip, stale-key rejection, atomic writes, reuse."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from kdistill.cache import (
    build_topk_cache,
    cache_key,
    fingerprint_model,
    fingerprint_tokens,
    key_dir,
    open_topk_cache,
    write_topk_cache,
)

N, L, K, V = 6, 5, 4, 50


def _random_topk(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(N, L, V, generator=g) * 3
    return torch.log_softmax(logits, -1).topk(K, dim=-1)


def _key(**over):
    base = {"teacher": "t0", "data": "d0", "block_size": L, "k": K}
    return cache_key(**{**base, **over})


def _write(root, key, values, ids, fail_at: int | None = None):
    def fill(a, b):
        if fail_at is not None and a >= fail_at:
            raise RuntimeError("teacher crashed")
        return values[a:b], ids[a:b]

    return write_topk_cache(root, key, (N, L), fill, batch_size=4)


def test_round_trip_is_memory_mapped_and_exact_up_to_float16(tmp_path):
    values, ids = _random_topk()
    cache = _write(tmp_path, _key(), values, ids)
    assert isinstance(cache.logprobs, np.memmap) and isinstance(cache.indices, np.memmap)
    reopened = open_topk_cache(tmp_path, _key())
    assert reopened is not None and len(reopened) == N and reopened.k == K
    rows = torch.tensor([4, 1, 4, 0])  # any order, repeats allowed
    lp, ix = reopened.lookup(rows)
    assert lp.dtype == torch.float32 and ix.dtype == torch.int64 and lp.shape == (4, L, K)
    assert torch.equal(ix, ids[rows])
    torch.testing.assert_close(lp, values[rows], rtol=2e-3, atol=2e-3)  # float16 storage
    meta = json.loads((reopened.path / "meta.json").read_text())
    assert meta["key"] == _key() and meta["shape"] == [N, L, K]


@pytest.mark.parametrize("change", [{"teacher": "t1"}, {"data": "d1"}, {"k": K + 1}, {"block_size": L + 1}])
def test_a_cache_is_never_used_for_another_key(tmp_path, change):
    values, ids = _random_topk()
    _write(tmp_path, _key(), values, ids)
    assert open_topk_cache(tmp_path, _key(**change)) is None


def test_a_cache_whose_stored_key_or_arrays_disagree_is_rejected(tmp_path):
    values, ids = _random_topk()
    cache = _write(tmp_path, _key(), values, ids)
    meta_file = cache.path / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "key": _key(teacher="someone-else")}))
    assert open_topk_cache(tmp_path, _key()) is None
    meta_file.write_text(json.dumps({**meta, "shape": [N + 1, L, K]}))  # arrays shorter than the key promises
    assert open_topk_cache(tmp_path, _key()) is None


def test_a_failed_write_leaves_no_cache_and_no_temp_files(tmp_path):
    values, ids = _random_topk()
    with pytest.raises(RuntimeError, match="teacher crashed"):
        _write(tmp_path, _key(), values, ids, fail_at=4)  # the first batch was written, the second fails
    assert open_topk_cache(tmp_path, _key()) is None
    assert not key_dir(tmp_path, _key()).exists()
    assert os.listdir(tmp_path) == []


def test_a_failed_rewrite_keeps_the_complete_cache_of_another_key(tmp_path):
    values, ids = _random_topk()
    good = _write(tmp_path, _key(), values, ids)
    with pytest.raises(RuntimeError):
        _write(tmp_path, _key(data="d2"), values, ids, fail_at=0)
    assert open_topk_cache(tmp_path, _key()) is not None
    assert sorted(os.listdir(tmp_path)) == [good.path.name]


def test_wrong_fill_shapes_are_refused(tmp_path):
    values, ids = _random_topk()
    with pytest.raises(ValueError, match="expected"):
        write_topk_cache(tmp_path, _key(), (N, L), lambda a, b: (values[a:b, :, :2], ids[a:b, :, :2]))
    assert os.listdir(tmp_path) == []


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
    first = build_topk_cache(teacher, ids, mask, k=K, root=tmp_path, batch_size=4)
    assert len(calls) == 2 and not first.reused  # 6 blocks in batches of 4
    with torch.no_grad():
        expected = torch.log_softmax(teacher(input_ids=ids).logits, -1).topk(K, dim=-1)
    lp, ix = first.lookup(torch.arange(N))
    assert torch.equal(ix, expected.indices)
    torch.testing.assert_close(lp, expected.values, rtol=2e-3, atol=2e-3)

    calls.clear()
    again = build_topk_cache(teacher, ids, mask, k=K, root=tmp_path)
    assert again.reused and again.path == first.path and not calls  # the teacher did not run

    with torch.no_grad():
        next(teacher.parameters()).add_(0.01)  # "fine-tuned" teacher: new fingerprint, new cache
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
