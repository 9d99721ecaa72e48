"""`ctr bench ...`: the benchmark commands (docs/*.md say which command made each table). Like
every `ctr` command, each imports its implementation only when it runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from runtime.features import DEFAULT_HISTORY_LEN
from slatectr.options import (
    HISTORY_LEN_OPTION,
    echo_json,
    key_values,
    names,
    parsed_sets,
    user_errors,
)

bench_app = typer.Typer(
    help="Benchmark tables (docs/*.md say which command made each).", no_args_is_help=True
)


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
    history_len: Annotated[int, HISTORY_LEN_OPTION] = DEFAULT_HISTORY_LEN,
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
    keep = set(names(only)) if only else None
    variants = [v for v in VARIANTS if keep is None or v.model in keep]
    variants = [v for v in variants if ablations or not v.overrides]
    seed_list = _seed_list(seeds)
    parsed = {v.model: parsed_sets(v.model, set_ or []) for v in variants}
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

    with user_errors():
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
    history_len: Annotated[int, HISTORY_LEN_OPTION] = DEFAULT_HISTORY_LEN,
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

    chosen = names(models)
    try:
        check_models(chosen)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--models") from None
    seed_list = _seed_list(seeds)
    with user_errors():
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
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="A model config field, NAME=VALUE (repeatable): every model is timed with its "
            "defaults and then with these, e.g. --models sarn --set recent_items=5.",
        ),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Also write the rows as JSON here.")] = None,
) -> None:
    """Per-candidate cost of every serving layout vs the slate-shared reference graph, the
    pairwise graph and PyTorch eager (CPU; thread CPU time and wall time, medians)."""
    from exporters.bench import BenchConfig, format_table, run_bench

    model_names = names(models)
    for name in model_names:  # unknown fields or values: a usage error, before any work
        if training := parsed_sets(name, set_ or [])[1]:
            raise typer.BadParameter(f"not model fields: {sorted(training)}", param_hint="--set")
    config = BenchConfig(
        models=model_names,
        users=_ints(users, "--users"),
        slates=_ints(slate, "--slate"),
        histories=_ints(history, "--history"),
        repeats=repeats,
        threads=threads,
        overrides=set_ or [],
    )
    rows = run_bench(config)
    typer.echo(format_table(rows, config))
    if out is not None:
        out.write_text(json.dumps([r.to_json() for r in rows], indent=2) + "\n")


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
        export_models=names(export_models),
    )
    config.service_env.update(key_values(serve_env))
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
    service_cpus: Annotated[
        str | None, typer.Option(help="CPUs for the service, e.g. 0-7 (default: any).")
    ] = None,
    generator_cpus: Annotated[
        str | None, typer.Option(help="CPUs for the load generator, e.g. 8-15 (default: any).")
    ] = None,
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
        service_cpus=_cpus(service_cpus, "--service-cpus"),
        generator_cpus=_cpus(generator_cpus, "--generator-cpus"),
    )
    run_overhead(config, progress=lambda step: typer.echo(f"... {step}", err=True))
    typer.echo((out / "overhead.md").read_text())


def _cpus(text: str | None, option: str) -> set[int] | None:
    """A CPU list ('0-3,8') of CPUs this process may use, or None; else a usage error."""
    from loadtest.cpu_split import parse_cpu_list

    try:
        return None if text is None else parse_cpu_list(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint=option) from None


def _ints(text: str, option: str) -> list[int]:
    """'1,8,32' -> [1, 8, 32]; anything else is a usage error naming `option`."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        message = f"expected integers like 1,8,32, got {text!r}"
        raise typer.BadParameter(message, param_hint=option) from None


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
        models=tuple(names(models)) if models else None,
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
    echo_json({"bundle": str(out), "wheels": len(manifest["files"]), "parts": parts})
