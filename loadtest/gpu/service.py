"""Step 4 of `ctr bench gpu`: `ctr serve` with the GPU required, its readiness, a short load test.

The service starts with `CTR_REQUIRE_GPU=true`: `/readyz` answers 200 only when every model
runs on the CUDA provider, and `/v1/models` says which provider each model got. On a GPU the
check wants 200; in the dry run (`CTR_PROVIDERS=CPUExecutionProvider`) it wants the gate to
refuse, 503 "not on the GPU". Either way the load test runs (readiness is not needed to score,
and the provider is recorded beside the figures, so a CPU fallback can never pass for a GPU
figure). The service process imports no torch, so it gets the `nvidia-*` wheels' library
folders as LD_LIBRARY_PATH (`environment.cuda_library_path`).

The load test is `ctr bench suite`'s measurement (`loadtest.bench.measure_service`):
closed-loop locust users until saturation (goodput = candidates/s of successful answers,
p99), then Poisson arrivals at half that rate (p99 at half saturation), histories seeded into
the embedded Redis through `/v1/events`. The deadline is 5 s, as in the suite: saturation
measures capacity, not deadline drops.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from loadtest.gpu.build import Say
from loadtest.gpu.config import CPU, CheckConfig
from loadtest.gpu.environment import cuda_library_path
from loadtest.local_service import LocalService

NOT_ON_GPU = "is not on the GPU"  # service.engine's readiness reason


def service_env(config: CheckConfig) -> dict[str, str]:
    env = {
        "CTR_MODELS": config.service_model,
        "CTR_DEFAULT_MODEL": config.service_model,
        "CTR_REQUEST_TIMEOUT_MS": "5000",
        "CTR_QUEUE_MAX_REQUESTS": "1024",
        "CTR_REQUIRE_GPU": "true",
        "LD_LIBRARY_PATH": cuda_library_path(),
    }
    if config.provider == CPU:
        env["CTR_PROVIDERS"] = CPU  # the dry run: the gate must refuse
    return env


def _answer(url: str) -> dict[str, Any]:
    answer = httpx.get(url, timeout=10)
    return {"status": answer.status_code, "body": answer.json()}


def readiness(service: LocalService, model: str) -> dict[str, Any]:
    """/readyz as the service answers it, whether that is a refusal because a model is not on
    the GPU, and the providers /v1/models reports for `model`."""
    ready = _answer(f"{service.url}/readyz")
    listed = _answer(f"{service.url}/v1/models")["body"].get("models", [])
    entry: dict[str, Any] = next((m for m in listed if m["name"] == model), {})
    reasons = ready["body"].get("reasons", [])
    return {
        "readyz": ready,
        "refused_not_on_gpu": ready["status"] == 503 and any(NOT_ON_GPU in r for r in reasons),
        "provider": entry.get("provider"),
        "providers": entry.get("providers"),
    }


def measure(config: CheckConfig, repo: Path, world: Path, say: Say) -> dict[str, Any]:
    """Step 4: readiness with the GPU required, then saturation and half-saturation load."""
    from loadtest.bench import SuiteConfig, batch_stats, measure_service, service_row

    out = config.work_dir / "service"
    env = service_env(config)
    say(f"service: ctr serve with CTR_REQUIRE_GPU=true on {config.provider}")
    # Started once /healthz answers: the models are loaded by then, so /readyz is final.
    with LocalService(repo, out / "service.log", env, 300, ready_path="/healthz") as service:
        result: dict[str, Any] = {"require_gpu": True, "slate": config.service_slate}
        result.update(readiness(service, config.service_model))
        suite = SuiteConfig(
            repo=repo,
            world=world,
            out=out,
            model=config.service_model,
            slate=config.service_slate,
            history=config.history,
            concurrency=config.concurrency,
            seconds=config.load_seconds,
            settle_s=config.settle_s,
        )
        say(f"service: load test, {config.concurrency} users, then half their rate")
        full, half = measure_service(
            suite, service.url, out, seed=True, workers=config.locust_workers, ready_path="/healthz"
        )
        result["load"] = service_row("service", full, half, **batch_stats(service.url))
    return result
