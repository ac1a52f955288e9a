"""An output that cannot be written is a user's problem: every verb checks where its outputs go before it works
(a probe file; the free space where it knows the size), and a disk that fills up or a refused write at the end is
exit 2 with one line naming the output, never an internal error, and leaves nothing half-written.

The faults are injected (os.open / open / mkdir refused under a dir, shutil.disk_usage, the writer raising
OSError): CI runs as root, which file modes do not stop."""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from kdistill.cli import main
from kdistill.io import PROBE, WriteError, check_writable, human_size, output_errors
from tests.conftest import tiny_gpt2
from tests.helpers import given_teacher_recipe, save_teacher_dir, write_lm_recipe, write_toy_csv


def kdistill_main(capsys, *args) -> tuple[int, list[str]]:
    """(exit code, stderr lines that are kdistill's messages) of the CLI run in this process."""
    with pytest.raises(SystemExit) as exited:
        main([str(a) for a in args])
        raise SystemExit(0)
    err = capsys.readouterr().err
    return exited.value.code, [line for line in err.splitlines() if line.startswith("kdistill: ")]


def refuse_writes(monkeypatch, root: Path, code: int = errno.EROFS) -> None:
    """Creating or writing any file or dir under `root` fails with `code`, as on a read-only mount or a dir the
    user may not write."""
    root = Path(root).absolute()
    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir

    def under(path) -> bool:
        return isinstance(path, (str, os.PathLike)) and Path(os.fspath(path)).absolute().is_relative_to(root)

    def refuse(path):
        raise OSError(code, os.strerror(code), os.fspath(path))

    def os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and under(path):
            refuse(path)
        return real_os_open(path, flags, *args, **kwargs)

    def open_(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and under(file):
            refuse(file)
        return real_open(file, mode, *args, **kwargs)

    def mkdir(path, *args, **kwargs):
        if under(path):
            refuse(path)
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(io, "open", open_)
    monkeypatch.setattr(os, "mkdir", mkdir)


def little_free_space(monkeypatch, free: int = 1000) -> None:
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=free))


def fail_fsync(monkeypatch, code: int = errno.ENOSPC) -> None:
    """fsync fails, as when the data a full disk could not take is flushed (atomic_file fsyncs before renaming)."""
    def fsync(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "fsync", fsync)


def never(what: str):
    def called(*args, **kwargs):
        pytest.fail(f"{what} ran although the output could not be written")
    return called


def leftovers(folder: Path) -> list[str]:
    """Temp files and dirs of an atomic write, and probe files, under `folder`."""
    return sorted(p.name for p in folder.rglob(".*") if p.name.endswith(".tmp") or p.name.startswith(PROBE))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer):
    return save_teacher_dir(tmp_path_factory.mktemp("model") / "model", tiny_tokenizer)


@pytest.fixture(scope="module")
def toy_csv(tmp_path_factory):
    return write_toy_csv(tmp_path_factory.mktemp("data") / "toy.csv", 30)


# ---------------------------------------------------------------------------------------------- the helpers

def test_check_writable_probes_the_nearest_existing_dir_and_compares_the_free_space(tmp_path, monkeypatch):
    check_writable(tmp_path / "new" / "deeper" / "out.jsonl", 10)  # the missing dirs are created later
    assert not list(tmp_path.iterdir())
    little_free_space(monkeypatch, free=1536)
    with pytest.raises(WriteError) as err:
        check_writable(tmp_path / "out.jsonl", 3 * 1024 ** 2)
    assert str(err.value) == (f"cannot write {tmp_path / 'out.jsonl'}: it needs about 3.0 MiB, {tmp_path} has "
                              "1.5 KiB free; free space or choose another location")
    refuse_writes(monkeypatch, tmp_path, errno.EACCES)
    with pytest.raises(WriteError, match=rf"^cannot write {tmp_path / 'sub'}: Permission denied; "):
        check_writable(tmp_path / "sub", inside=True)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG])
def test_output_errors_name_the_output_not_its_temp_file(tmp_path, code):
    out = tmp_path / "out.json"
    with pytest.raises(WriteError) as err, output_errors(out):
        raise OSError(code, os.strerror(code), str(tmp_path / ".out.json.1a2b3c4d.tmp"))
    assert str(err.value).startswith(f"cannot write {out}: {os.strerror(code)}; ")
    with pytest.raises(OSError), output_errors(out):  # not a write error: a bug, shown as one
        raise OSError(errno.EBADF, "Bad file descriptor")


# ------------------------------------------------------------------------------------------------- export

def test_export_into_a_dir_that_cannot_be_written_exits_2_before_loading_the_model(model_dir, tmp_path,
                                                                                    monkeypatch, capsys):
    import kdistill.deploy.export as export

    monkeypatch.setattr(export, "load_dir_model", never("loading the model"))
    (tmp_path / "ro").mkdir()
    refuse_writes(monkeypatch, tmp_path / "ro")
    code, lines = kdistill_main(capsys, "export", model_dir, "--format", "onnx", "--out", tmp_path / "ro" / "onnx")
    assert code == 2
    assert lines == [f"kdistill: cannot write {tmp_path / 'ro' / 'onnx'}: Read-only file system; free space, fix "
                     "the permissions or choose another location"]
    assert not (tmp_path / "ro" / "onnx").exists()


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_export_states_the_space_it_needs_and_refuses_before_loading_the_model(model_dir, tmp_path, monkeypatch,
                                                                              capsys, quantize):
    import kdistill.deploy.export as export

    monkeypatch.setattr(export, "load_dir_model", never("loading the model"))
    little_free_space(monkeypatch)
    files = [f for f in model_dir.rglob("*") if f.is_file()]
    weights = sum(f.stat().st_size for f in files if f.suffix == ".safetensors")
    needed = sum(f.stat().st_size for f in files) + (weights // 4 if quantize else 0)
    assert export.export_bytes(model_dir, quantize) == needed
    out = tmp_path / "onnx"
    code, lines = kdistill_main(capsys, "export", model_dir, "--out", out, *(["--quantize", quantize] if quantize
                                                                            else []))
    assert code == 2
    assert lines == [f"kdistill: cannot write {out}: it needs about {human_size(needed)}, {tmp_path} has 1000 B "
                     "free; free space or choose another location"]
    assert not out.exists()


def test_a_disk_full_while_exporting_exits_2_naming_the_out_dir_and_leaves_nothing(model_dir, tmp_path,
                                                                                   monkeypatch, capsys):
    import kdistill.deploy.export as export

    def disk_full(model, tokenizer, tmp, *args, **kwargs):
        (tmp / "model.onnx").write_bytes(b"half a graph")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp / "model.onnx"))

    monkeypatch.setattr(export, "_write_onnx", disk_full)
    out = tmp_path / "onnx"
    code, lines = kdistill_main(capsys, "export", model_dir, "--out", out)
    assert code == 2
    assert lines == [f"kdistill: cannot write {out}: No space left on device; free space, fix the permissions or "
                     "choose another location"]
    assert not out.exists() and leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------------ predict

@pytest.fixture
def texts_file(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"text": f"the team won match {i}"}) + "\n" for i in range(20)))
    return path


def test_predict_states_the_space_it_needs_and_refuses_before_loading_the_model(model_dir, texts_file, tmp_path,
                                                                               monkeypatch, capsys):
    import kdistill.deploy.predict as predict

    monkeypatch.setattr(predict, "load_predictor", never("loading the model"))
    little_free_space(monkeypatch, free=100)
    out = tmp_path / "preds.jsonl"
    code, lines = kdistill_main(capsys, "predict", model_dir, "--file", texts_file, "--out", out)
    assert code == 2
    needed = human_size(texts_file.stat().st_size)  # each output line holds its input line
    assert lines == [f"kdistill: cannot write {out}: it needs about {needed}, {tmp_path} has 100 B free; free "
                     "space or choose another location"]
    assert not out.exists()


@pytest.mark.parametrize("texts", [False, True])
def test_a_disk_full_while_writing_predictions_exits_2_naming_the_file_and_leaves_nothing(model_dir, texts_file,
                                                                                        tmp_path, monkeypatch,
                                                                                        capsys, texts):
    out = tmp_path / "preds.jsonl"
    fail_fsync(monkeypatch)
    args = ["the team won"] if texts else ["--file", texts_file]
    code, lines = kdistill_main(capsys, "predict", model_dir, *args, "--out", out)
    assert code == 2
    assert lines == [f"kdistill: cannot write {out}: No space left on device; free space, fix the permissions or "
                     "choose another location"]
    assert not out.exists() and leftovers(tmp_path) == []


def test_predict_into_a_dir_that_cannot_be_written_exits_2_before_loading_the_model(model_dir, texts_file, tmp_path,
                                                                                   monkeypatch, capsys):
    import kdistill.deploy.predict as predict

    monkeypatch.setattr(predict, "load_predictor", never("loading the model"))
    (tmp_path / "ro").mkdir()
    refuse_writes(monkeypatch, tmp_path / "ro", errno.EACCES)
    code, lines = kdistill_main(capsys, "predict", model_dir, "--file", texts_file, "--out", tmp_path / "ro" / "p")
    assert code == 2 and lines[0].startswith(f"kdistill: cannot write {tmp_path / 'ro' / 'p'}: Permission denied; ")


# ----------------------------------------------------------------------------------------------- evaluate

@pytest.mark.parametrize("default_out", [False, True])
def test_evaluate_into_a_dir_that_cannot_be_written_exits_2_before_loading_the_model(model_dir, toy_csv, tmp_path,
                                                                                    monkeypatch, capsys,
                                                                                    default_out):
    import kdistill.pipeline.verbs as verbs

    monkeypatch.setattr(verbs, "load_model_dir", never("loading the model"))
    monkeypatch.setattr(verbs, "data_for_model", never("reading the data"))
    if default_out:  # <model>/metrics.json: the model dir is read-only
        refuse_writes(monkeypatch, model_dir)
        target, args = model_dir / "metrics.json", []
    else:
        (tmp_path / "ro").mkdir()
        refuse_writes(monkeypatch, tmp_path / "ro")
        target = tmp_path / "ro" / "m.json"
        args = ["--out", target]
    code, lines = kdistill_main(capsys, "evaluate", model_dir, "--data", toy_csv, "--split", "all", *args)
    assert code == 2
    assert lines == [f"kdistill: cannot write {target}: Read-only file system; free space, fix the permissions or "
                     "choose another location"]


def test_a_disk_full_while_writing_metrics_exits_2_naming_the_file_and_leaves_nothing(model_dir, toy_csv, tmp_path,
                                                                                    monkeypatch, capsys):
    out = tmp_path / "m.json"
    fail_fsync(monkeypatch, errno.EDQUOT)
    code, lines = kdistill_main(capsys, "evaluate", model_dir, "--data", toy_csv, "--split", "all", "--out", out,
                                "--set", "data.max_length=16")
    assert code == 2
    assert lines == [f"kdistill: cannot write {out}: {os.strerror(errno.EDQUOT)}; free space, fix the permissions "
                     "or choose another location"]
    assert not out.exists() and leftovers(tmp_path) == []


# ----------------------------------------------------------------------------------------- teacher-signal

@pytest.fixture
def lm_recipe(tmp_path, bpe_tokenizer, docs, monkeypatch):
    monkeypatch.setenv("KDISTILL_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "recipe").mkdir()
    return write_lm_recipe(tmp_path / "recipe", tiny_gpt2(bpe_tokenizer), bpe_tokenizer, docs, name="tiny-lm",
                           block_size=32, student={"layers": 2},
                           distill={"losses": {"forward_kl": 1.0, "lm": 0.5}, "cache_top_k": 16})


@pytest.mark.parametrize("default_out", [False, True])
def test_teacher_signal_into_a_dir_that_cannot_be_written_exits_2_before_loading_the_teacher(lm_recipe, tmp_path,
                                                                                            monkeypatch, capsys,
                                                                                            default_out):
    import kdistill.tasks.causal_lm as causal_lm

    monkeypatch.setattr(causal_lm, "load_causal_teacher", never("loading the teacher"))
    # the automatic cache ($KDISTILL_CACHE_DIR/teacher-topk) or --out, in a dir that cannot be written
    out = tmp_path / "cache" / "teacher-topk" if default_out else tmp_path / "ro" / "signal"
    out.parent.mkdir()
    refuse_writes(monkeypatch, out.parent)
    code, lines = kdistill_main(capsys, "teacher-signal", lm_recipe, *([] if default_out else ["--out", out]))
    assert code == 2
    assert lines == [f"kdistill: cannot write {out}: Read-only file system; free space, fix the permissions or "
                     "choose another location"]


def test_teacher_signal_states_the_space_it_needs_and_refuses_before_the_teacher_runs(lm_recipe, tmp_path,
                                                                                     monkeypatch, capsys):
    import kdistill.cache.build as build

    monkeypatch.setattr(build, "teacher_topk", never("the teacher"))
    sized = []
    real_bytes = build.signal_bytes
    monkeypatch.setattr(build, "signal_bytes", lambda key, n: sized.append((key, n)) or real_bytes(key, n))
    little_free_space(monkeypatch, free=2048)
    out = tmp_path / "signal"
    code, lines = kdistill_main(capsys, "teacher-signal", lm_recipe, "--out", out)
    assert code == 2
    [(key, blocks)] = sized
    needed = blocks * 32 * 16 * (4 + 2)  # blocks x block_size x k x (int32 id + float16 log-prob)
    assert key["block_size"] == 32 and key["k"] == 16 and real_bytes(key, blocks) == needed
    assert lines == [f"kdistill: cannot write {out}: it needs about {human_size(needed)}, {tmp_path} has 2.0 KiB "
                     "free; free space or choose another location"]
    assert not out.exists()


def test_a_disk_full_while_writing_a_shard_exits_2_naming_it_and_leaves_no_temp_file(lm_recipe, tmp_path,
                                                                                   monkeypatch, capsys):
    real_write = pq.write_table

    def disk_full(table, where, **kwargs):
        real_write(table.slice(0, 1), where, **kwargs)  # some bytes went out, then the disk was full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pq, "write_table", disk_full)
    out = tmp_path / "signal"
    code, lines = kdistill_main(capsys, "teacher-signal", lm_recipe, "--out", out)
    assert code == 2
    assert lines == [f"kdistill: cannot write {out / 'shard-00000.parquet'}: No space left on device; free space, "
                     "fix the permissions or choose another location"]
    assert sorted(p.name for p in out.iterdir()) == []  # no shard, no temp file, no manifest


# ---------------------------------------------------------------------------------------------------- run

@pytest.fixture(scope="module")
def recipe(tmp_path_factory, tiny_tokenizer):
    return given_teacher_recipe(tmp_path_factory.mktemp("run"), tiny_tokenizer, {"kd": 1.0, "ce": 0.5})


def test_a_run_whose_dir_is_removed_after_a_full_disk_does_not_suggest_resuming_it(recipe, tmp_path, monkeypatch,
                                                                                  capsys):
    import kdistill.pipeline.encoder as encoder

    def disk_full(model, tokenizer, path, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path / "model.safetensors"))

    monkeypatch.setattr(encoder, "save_model", disk_full)  # the student, the first thing saved to resume from
    out = tmp_path / "run"
    code, lines = kdistill_main(capsys, "run", recipe, "--out", out)
    assert code == 2 and len(lines) == 1
    assert lines[0].startswith(f"kdistill: cannot write {out / 'student' / 'model.safetensors'}: No space left")
    assert not out.exists()  # nothing was saved to resume from: the run removed what it created
    assert "--resume" not in lines[0] and "start the run again" in lines[0]


def test_a_run_that_saved_a_phase_before_the_disk_filled_suggests_resuming_it(recipe, tmp_path, monkeypatch,
                                                                             capsys):
    import kdistill.pipeline.encoder as encoder

    real = encoder.atomic_write_json

    def disk_full(path, obj):
        if Path(path).name == "metrics.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, obj)

    monkeypatch.setattr(encoder, "atomic_write_json", disk_full)
    out = tmp_path / "run"
    code, lines = kdistill_main(capsys, "run", recipe, "--out", out)
    assert code == 2
    assert lines == [f"kdistill: cannot write {out / 'metrics.json'}: No space left on device; free space or fix "
                     f"permissions, then continue with --resume {out}"]
    assert (out / "student" / "model.safetensors").is_file()  # kept: --resume goes on from it


def test_a_run_into_a_dir_that_cannot_be_written_exits_2_before_reading_the_data(recipe, tmp_path, monkeypatch,
                                                                                capsys):
    import kdistill.pipeline.encoder as encoder

    monkeypatch.setattr(encoder, "get_task", never("reading the data"))
    (tmp_path / "ro").mkdir()
    refuse_writes(monkeypatch, tmp_path / "ro")
    code, lines = kdistill_main(capsys, "run", recipe, "--out", tmp_path / "ro" / "run")
    assert code == 2
    assert lines == [f"kdistill: cannot write the run directory {tmp_path / 'ro' / 'run'}: Read-only file system"]
