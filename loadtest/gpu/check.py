"""`ctr bench gpu`: the five steps in one go, one report (docs/gpu.md).

1. environment: GPU, driver, CUDA, cuDNN, the onnxruntime build and whether CUDA loads;
2. models: SARN, FAT, DIN and NCM trained and exported (or taken from `--repo`), then ORT on
   the device against ORT on the CPU and PyTorch on the device, and the fp16 variant;
3. raw ORT throughput on the device, plain run and IOBinding;
4. `ctr serve` with the GPU required: readiness, then goodput and p99 under load;
5. the training of step 2 ran on the device: its loss must fall.

A step that fails is recorded with its error and the steps that do not depend on it still
run: on a GPU host lent for minutes, one broken piece must not hide the other figures. The
report is rewritten after every step. Exit code: 0 everything ran and no verdict failed, 1 a
check or target failed, 2 a step could not run.
"""

from __future__ import annotations

import contextlib
import platform
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import Any

from loadtest.gpu import report as report_file
from loadtest.gpu import targets
from loadtest.gpu.build import Models
from loadtest.gpu.config import CheckConfig, failure

EXIT_OK, EXIT_FAILED, EXIT_ERROR = 0, 1, 2


class NoGpu(RuntimeError):
    """A GPU run was asked for on a machine where torch sees no CUDA device."""


class Progress:
    """One line per stage on stderr, with the seconds since the start."""

    def __init__(self) -> None:
        self.started = time.monotonic()

    def __call__(self, message: str) -> None:
        elapsed = time.monotonic() - self.started
        print(f"[gpu-check {elapsed:6.1f}s] {message}", file=sys.stderr, flush=True)


class Run:
    """The report being built, and the step wrapper that records each step's outcome."""

    def __init__(self, config: CheckConfig) -> None:
        self.config = config
        self.say = Progress()
        self.models: Models | None = None  # kept when some models fail: the rest are checked
        self.report: dict[str, Any] = {
            "dry_run": config.dry_run,
            "device_provider": config.provider,
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "host": platform.node(),
            "config": {k: str(v) for k, v in asdict(config).items()},
            "steps": {},
        }

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        self.say(f"step {name}")
        started = time.monotonic()
        record: dict[str, Any] = {"status": "ok"}
        try:
            yield
        except Exception as exc:  # recorded; the remaining steps still run
            record = {"status": "error", "error": failure(exc)}
            self.say(f"step {name} failed: {record['error']}")
        record["seconds"] = time.monotonic() - started
        self.report["steps"][name] = record
        report_file.write(self.report, self.config.out)

    def skip(self, name: str, why: str) -> None:
        self.report["steps"][name] = {"status": "skipped", "error": why, "seconds": 0.0}


def _device(config: CheckConfig) -> str:
    return "cpu" if config.dry_run else "cuda"


def _environment(run: Run) -> None:
    from loadtest.gpu.environment import probe

    run.report["environment"] = env = probe(run.config.dry_run)
    if not run.config.dry_run and not env["torch"]["cuda_available"]:
        raise NoGpu(
            "torch sees no CUDA device (torch.cuda.is_available() is False): run this on a GPU "
            "host, or use --dry-run for the CPU walk-through"
        )


def _models(run: Run) -> None:
    from loadtest.gpu.build import build

    run.models = models = build(run.config, _device(run.config), run.say)
    run.report["models"] = {
        "world": str(models.world),
        "dirs": {name: str(path) for name, path in models.dirs.items()},
        "training": models.training,
        "exports": models.exports,
        "errors": models.errors,
    }
    if models.errors:
        raise RuntimeError(f"{len(models.errors)} model(s) failed: {', '.join(models.errors)}")


def _parity(run: Run, models: Models) -> None:
    from loadtest.gpu.parity import check_model

    run.report["parity"] = rows = []
    for name, directory in models.dirs.items():
        run.say(f"parity: {name}")
        rows.append(check_model(run.config, directory, models.world, _device(run.config)))


def _throughput(run: Run, models: Models) -> None:
    from loadtest.gpu.throughput import measure

    run.report["throughput"] = measure(run.config, models.dirs, models.world, run.say)


def _service(run: Run, models: Models) -> None:
    from loadtest.gpu.service import measure

    name = run.config.service_model
    if name not in models.dirs:
        raise RuntimeError(f"the service's model {name} is not among the checked models")
    repo = models.dirs[name].parents[1]
    run.report["service"] = measure(run.config, repo, models.world, run.say)


def _verdict(report: dict[str, Any]) -> tuple[str, int]:
    statuses = [v["status"] for v in report["checks"] + report["targets"]]
    errors = [n for n, s in report["steps"].items() if s["status"] != "ok"]
    failed = statuses.count("fail")
    if errors:
        return f"steps not completed: {', '.join(errors)}; {failed} verdict(s) failed", EXIT_ERROR
    if failed:
        return f"{failed} verdict(s) failed", EXIT_FAILED
    if report["dry_run"]:
        return "dry run: every step ran on the CPU; GPU figures absent", EXIT_OK
    absent = statuses.count("absent")
    return f"every verdict passed ({absent} absent)" if absent else "every verdict passed", EXIT_OK


def run_check(config: CheckConfig) -> tuple[dict[str, Any], int]:
    """Runs the steps in order; -> (the report, the exit code)."""
    run = Run(config)
    steps: list[tuple[str, Callable[[Run, Models], None]]] = [
        ("parity", _parity),
        ("throughput", _throughput),
        ("service", _service),
    ]
    with run.step("environment"):
        _environment(run)
    if run.report["steps"]["environment"]["status"] == "ok":
        with run.step("models"):
            _models(run)
    else:
        run.skip("models", "the environment step failed")
    for name, function in steps:
        if run.models is None or not run.models.dirs:
            run.skip(name, "no model to check")
            continue
        with run.step(name):
            function(run, run.models)
    run.report["checks"] = targets.as_json(targets.checks(run.report))
    run.report["targets"] = targets.as_json(targets.targets(run.report))
    run.report["verdict"], code = _verdict(run.report)
    run.report["seconds"] = time.monotonic() - run.say.started
    report_file.write(run.report, config.out)
    run.say(f"report: {config.out / report_file.REPORT_MD} ({run.report['verdict']})")
    return run.report, code
