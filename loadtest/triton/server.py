"""The benchmark's peer: NVIDIA Triton (through PyTriton) serving the same exported ONNX model.

Run it in an environment with the `bench` extra (`nvidia-pytriton`, which pins numpy < 2, so
it lives in its own venv; see docs/performance.md) and the repository on PYTHONPATH:

    LD_LIBRARY_PATH=<python>/lib PYTHONPATH=. python -m loadtest.triton.server \
        --model-dir REPO/sarn/1 --http-port 8010

Triton's dynamic batcher is on: requests queued while the model runs are merged into one
call of up to `--max-batch` users (`--delay-us` extra wait, 0 = greedy like the service). A
request is one user's slate as KServe-v2 tensors of vocabulary indices (the client maps the
ids): `user [1]`, `hist_items`/`hist_cats [L]`, `cand_items`/`cand_cats [K]`; Triton stacks
a batch to [B, ...] and the function below turns it into the same ragged feeds the service
sends ONNX Runtime (`cand_user_index`), so both run the identical graph per user.

Imports numpy, onnxruntime, pytriton and the torch-free runtime.loader only.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import numpy as np

from runtime.features import OOV
from runtime.loader import LoadedModel, open_model


def infer_function(model: LoadedModel) -> Any:
    from pytriton.decorators import batch

    contexts = len(model.spec.context_fields)

    @batch
    def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        items = inputs["cand_items"]  # [B, K]
        users, k = items.shape
        feeds = {
            "user": inputs["user"].reshape(-1),  # [B]
            "hist_items": inputs["hist_items"],  # [B, L]
            "hist_cats": inputs["hist_cats"],  # [B, L]
            "context": np.full((users, contexts), OOV, dtype=np.int64),  # [B, C]: none sent
            "cand_items": items.reshape(-1),  # [B*K]
            "cand_cats": inputs["cand_cats"].reshape(-1),  # [B*K]
            "cand_user_index": np.repeat(np.arange(users, dtype=np.int64), k),  # [B*K]
        }
        # Column 0 is pCTR; the peer serves the click probability only, like its config.
        return {"scores": model.run(feeds)[:, 0].reshape(users, k)}  # [B, K]

    return infer


def serve(args: argparse.Namespace) -> None:
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    model = open_model(
        Path(args.model_dir), providers=["CPUExecutionProvider"], intra_op_threads=args.threads
    )
    if model.kind != "behavior":
        raise SystemExit("the peer serves behaviour models (slate-shared graph) only")
    vector = (-1,)
    loopback = "127.0.0.1"  # like the service in benchmarks: never listen beyond this host
    config = TritonConfig(
        http_address=loopback,
        http_port=args.http_port,
        grpc_address=loopback,
        grpc_port=args.grpc_port,
        metrics_address=loopback,
        metrics_port=args.metrics_port,
        log_verbose=0,
    )
    with Triton(config=config) as triton:
        triton.bind(
            model_name=args.name,
            infer_func=infer_function(model),
            inputs=[
                Tensor(name="user", dtype=np.int64, shape=(1,)),
                *(
                    Tensor(name=n, dtype=np.int64, shape=vector)
                    for n in ("hist_items", "hist_cats", "cand_items", "cand_cats")
                ),
            ],
            outputs=[Tensor(name="scores", dtype=np.float32, shape=vector)],
            config=ModelConfig(
                max_batch_size=args.max_batch,
                batcher=DynamicBatcher(max_queue_delay_microseconds=args.delay_us),
            ),
            strict=False,
        )
        triton.serve()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", required=True, help="REPO/NAME/VERSION")
    parser.add_argument("--name", default="ctr")
    parser.add_argument("--http-port", type=int, default=8010)
    parser.add_argument("--grpc-port", type=int, default=8011)
    parser.add_argument("--metrics-port", type=int, default=8012)
    parser.add_argument("--max-batch", type=int, default=64, help="users per batch")
    parser.add_argument("--delay-us", type=int, default=0, help="max queue delay (µs)")
    parser.add_argument("--threads", type=int, default=1, help="ORT intra-op threads")
    logging.basicConfig(level=logging.WARNING)
    serve(parser.parse_args())


if __name__ == "__main__":
    main()
