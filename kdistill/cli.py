"""`kdistill` command line. Every verb is a plain function, and the package exports each one with the command's
arguments (an option is the keyword argument of its name); from Python a verb returns its result and raises
`kdistill.UserError` where the command exits with code 2:

    import kdistill
    run_dir = kdistill.run("tiny", set=["train.epochs=1"], out="runs/try")
    kdistill.predict(run_dir / "student", ["Shares rose after the results."])

Exit codes: 0 success, 2 bad input or configuration (one line on stderr naming the file/row/key), 1 internal error.
Also runs as `python -m kdistill.cli ...`, which is what `accelerate launch -m` and `torchrun -m` need.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from kdistill.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Distil large Transformers into small, fast students, and measure the result.")

SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override a recipe key: --set train.epochs=2")]
OutOpt = Annotated[Optional[Path], typer.Option("--out", help="Run directory (default runs/<name>)")]
ResumeOpt = Annotated[Optional[Path], typer.Option(
    "--resume", help="Continue a killed run in this run dir: its config.yaml, finished phases kept, the phase it was "
                     "in from its last checkpoint")]
ReplaceOutOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out file")]
OverwriteOpt = Annotated[bool, typer.Option(
    "--overwrite", help="Use a non-empty --out: the outputs an earlier run left there are removed first (config.yaml, "
                        "model dirs, checkpoints, logs, metrics, report, export); other files are kept")]


def _config(recipe, overrides):
    from kdistill.config import load_config

    return load_config(recipe, overrides or [])


@app.command("run")
def run(recipe: Annotated[Optional[str], typer.Argument(help="Recipe file or shipped name (default: default)")]
        = None, set: SetOpt = None, out: OutOpt = None, resume: ResumeOpt = None,
        overwrite: OverwriteOpt = False) -> Path:
    """The whole pipeline: data -> teacher -> student -> distillation -> evaluation -> report."""
    from kdistill.checkpoint import resume_config
    from kdistill.pipeline import run as run_pipeline

    if resume is not None:
        run_dir = run_pipeline(resume_config(resume, recipe, set, out), resume, resume=True, overwrite=overwrite)
    else:
        run_dir = run_pipeline(_config(recipe, set), out, overwrite=overwrite)
    _print_summary(run_dir)
    return run_dir


@app.command("train-teacher")
def train_teacher(recipe: str, set: SetOpt = None, out: OutOpt = None, overwrite: OverwriteOpt = False) -> Path:
    """Fine-tune (or train from scratch) the recipe's teacher and evaluate it; writes <out>/teacher."""
    from kdistill.pipeline import teacher_run

    run_dir, teacher_dir = teacher_run(_config(recipe, set), out, overwrite=overwrite)
    _print_summary(run_dir)
    return teacher_dir


@app.command("teacher-signal")
def teacher_signal(recipe: str, set: SetOpt = None,
                   out: Annotated[Optional[Path], typer.Option(
                       "--out", help="Dir to write the signal into (new or empty; default: the automatic cache, "
                                     "where `kdistill run` finds it)")] = None) -> Path:
    """Run a causal-LM recipe's teacher once over its training text and store its top-k next-token log-probs (and,
    for a student with another tokenizer, its tokens' byte ends) as Parquet shards + manifest.json. A run reads it
    with --set distill.teacher_signal=<dir or fsspec URL>. Resumable; shards split over torchrun processes."""
    from kdistill.pipeline import signal_run

    path = signal_run(_config(recipe, set), out)
    print(path)
    return path


@app.command("distill")
def distill(recipe: str, teacher: Annotated[Path, typer.Option(help="Trained teacher model dir")],
            set: SetOpt = None, out: OutOpt = None, overwrite: OverwriteOpt = False) -> Path:
    """Distil a student from an already trained teacher (the run without teacher training)."""
    from kdistill.pipeline import run as run_pipeline

    run_dir = run_pipeline(_config(recipe, [*(set or []), f"teacher.path={teacher}"]), out, overwrite=overwrite)
    _print_summary(run_dir)
    return run_dir


@app.command("evaluate")
def evaluate(model: Path, data: Annotated[str, typer.Option(help="Built-in dataset name or a data file")],
             split: Annotated[str, typer.Option(help="test | validation | train | all (every row of a file)")]
             = "test", set: SetOpt = None, out: Annotated[Optional[Path], typer.Option(
                 help="metrics.json path (default: <model>/metrics.json)")] = None,
             overwrite: ReplaceOutOpt = False,
             teacher: Annotated[Optional[Path], typer.Option(
                 help="Sentence encoders only: a teacher dir to measure agreement with (Spearman, recall@10)")]
             = None) -> dict:
    """Quality (accuracy and P/R/F1; entity F1 for NER; k-NN accuracy and agreement with a teacher for sentence
    encoders), size, latency and throughput of one model dir."""
    from kdistill.deploy.predict import check_output_file
    from kdistill.pipeline import evaluate_dir

    if out is not None:
        check_output_file(out, example="metrics.json", overwrite=overwrite)
    metrics = evaluate_dir(model, data, split=split, overrides=set or [], out=out, teacher=teacher)
    from kdistill.task import get_task

    keys = (*get_task(metrics["task"]).headline, "params", "size_mb", "latency_ms_batch1", "throughput_per_s")
    typer.echo(json.dumps({k: metrics[k] for k in keys if k in metrics}))
    return metrics


@app.command("report")
def report(run_dirs: Annotated[list[Path], typer.Argument(help="One or more run dirs")],
           out: Annotated[Optional[Path], typer.Option(help="Where report.md goes (default: first run dir)")]
           = None,
           peers: Annotated[Optional[list[Path]], typer.Option(
               help="A peers table (python -m benchmarks.peers.run writes <out>/<table>/peers.json: the file or its "
                    "dir) whose tools join the table and the trade-off plot; repeatable")] = None) -> Path:
    """report.md + plots comparing every model of the given runs (and of the tools in --peers tables)."""
    from kdistill.reporting import write_report

    path = write_report(run_dirs, out, peers)
    typer.echo(str(path))
    return path


@app.command("export")
def export(model: Path, format: Annotated[str, typer.Option("--format", help="hf | onnx | gguf")] = "onnx",
           quantize: Annotated[Optional[str], typer.Option(help="int8 (ONNX dynamic quantization)")] = None,
           out: Annotated[Optional[Path], typer.Option(help="Output dir (default <model>-<format>)")] = None,
           data: Annotated[Optional[str], typer.Option(help="Dataset whose test split checks parity")] = None,
           fuse: Annotated[bool, typer.Option(help="Fuse attention/LayerNorm/GELU for onnxruntime (BERT-like "
                                                   "encoders); --no-fuse keeps a portable plain ONNX graph")] = True,
           outtype: Annotated[Optional[str], typer.Option(help="GGUF weights: f32 (default) | f16 (half the size, "
                                                                     "outputs rounded)")] = None,
           set: SetOpt = None) -> dict:
    """Export a model dir as a self-contained HF dir, ONNX (optionally int8) or, for a Llama / Qwen2 causal LM, a
    GGUF file for llama.cpp and Ollama; each with a parity check."""
    from kdistill.deploy.export import check_export, export_model

    source = model.resolve()  # `export .` names its output after the folder, not after ""
    suffix = quantize or outtype
    out = out or source.with_name(f"{source.name}-{format}{'-' + suffix if suffix else ''}")
    check_export(model, fmt=format, out_dir=out, quantize=quantize, outtype=outtype)  # before the data is read
    texts = labels = None
    if data:
        from kdistill.pipeline import data_for_model

        bundle = data_for_model(model, data, set or [])
        texts, labels = list(bundle.splits["test"]["text"]), list(bundle.splits["test"]["label"])
    parity = export_model(model, fmt=format, out_dir=out, quantize=quantize, parity_texts=texts,
                          parity_labels=labels, fuse=fuse, outtype=outtype)
    typer.echo(json.dumps({"out": str(out), **{k: v for k, v in parity.items() if not isinstance(v, dict)}},
                          default=str))
    return parity


@app.command("predict")
def predict(model: Path, texts: Annotated[Optional[list[str]], typer.Argument(help="Texts to classify")] = None,
            file: Annotated[Optional[Path], typer.Option(help="JSONL input with a 'text' field")] = None,
            out: Annotated[Optional[Path], typer.Option(help="JSONL output (default stdout)")] = None,
            batch_size: int = 32, overwrite: ReplaceOutOpt = False) -> list[dict]:
    """Label, label name and probabilities for texts (PyTorch or ONNX, from what MODEL holds)."""
    from kdistill.deploy.predict import check_output_file, load_predictor, predict_file, write_jsonl_atomic

    if bool(texts) == bool(file):
        raise UserError("predict: give TEXT arguments or --file, not both or neither")
    if file:
        return predict_file(model, file, out, batch_size=batch_size, overwrite=overwrite)
    if out is not None:
        check_output_file(out, overwrite=overwrite)
    preds = load_predictor(model).predict(texts, batch_size=batch_size)
    records = [{"text": text, **p} for text, p in zip(texts, preds)]
    if out is not None:
        write_jsonl_atomic(out, records)
    if out is None:
        for r in records:
            typer.echo(json.dumps(r, ensure_ascii=False))
    return preds


@app.command("serve")
def serve(model: Path, host: str = "127.0.0.1", port: int = 8000, workers: int = 1,
          api_key: Annotated[Optional[str], typer.Option(envvar="KDISTILL_API_KEY",
                                                         help="Require this key (X-API-Key header or "
                                                              "Authorization: Bearer)")] = None,
          request_timeout: Annotated[float, typer.Option(
              help="Seconds a request may take, queue wait included, before it gets 503")] = 30.0,
          max_tokens: Annotated[int, typer.Option(
              help="Causal LM: the most tokens a request may ask to generate")] = 1024,
          default_max_tokens: Annotated[int, typer.Option(
              help="Causal LM: tokens generated for a request that sets no max_tokens")] = 256) -> None:
    """HTTP service: POST /predict, GET /health, GET /metadata (loopback unless --host says otherwise); a causal-LM
    dir answers the OpenAI-compatible API instead: /v1/models, /v1/completions, /v1/chat/completions."""
    from kdistill.deploy.serve import run_server

    run_server(model, host=host, port=port, workers=workers, api_key=api_key, request_timeout_s=request_timeout,
               max_tokens=max_tokens, default_max_tokens=default_max_tokens)


@app.command("recipes")
def recipes() -> dict[str, str]:
    """List the shipped recipes and what each demonstrates."""
    from kdistill.config import list_recipes

    return _listed(list_recipes(), width=24)


@app.command("datasets")
def datasets() -> dict[str, str]:
    """List the built-in datasets."""
    from kdistill.data import list_datasets

    return _listed(list_datasets(), width=20)


def _listed(described: dict[str, str], *, width: int) -> dict[str, str]:
    """Print name -> description, one per line; return them (the verb's Python result)."""
    for name, desc in described.items():
        typer.echo(f"{name:{width}s} {desc}")
    return described


@app.command("validate")
def validate(recipe: str, set: SetOpt = None) -> None:
    """Check a recipe (and overrides) without running it; prints the resolved config."""
    from kdistill.config import dump_config

    typer.echo(dump_config(_config(recipe, set)), nl=False)


def _print_summary(run_dir: Path) -> None:
    from kdistill.training import is_main_process

    if not is_main_process():  # several processes ran: the main one reports
        return
    metrics_file = Path(run_dir) / "metrics.json"
    if metrics_file.is_file():
        from kdistill.reporting import summary_table

        metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
        typer.echo(summary_table([{"metrics": metrics}]))
    typer.echo(f"run dir: {run_dir}")


def main(argv: list[str] | None = None) -> None:
    main_process = os.environ.get("RANK", "0") == "0"  # torchrun / accelerate launch: the other processes warn only
    logging.basicConfig(level=os.environ.get("KDISTILL_LOG", "INFO") if main_process else "WARNING",
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "accelerate", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import transformers

    # per-shard loading bars and the "newly initialised classifier" note are expected here, not news
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        app(args=argv, standalone_mode=False)
    except UserError as e:
        print(f"kdistill: {e}", file=sys.stderr)
        sys.exit(2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.TyperException as e:  # usage errors (typer's own copy of click's): unknown option, missing argument
        e.show()
        sys.exit(2)
    except typer.Abort:
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - the last line of defence: one line, exit 1, traceback on request
        if os.environ.get("KDISTILL_DEBUG"):
            raise
        print(f"kdistill: internal error: {type(e).__name__}: {e} (set KDISTILL_DEBUG=1 for the traceback)",
              file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
