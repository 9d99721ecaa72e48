"""Step 1 of `ctr bench gpu`: what this machine is — GPU, driver, CUDA, cuDNN — and which
onnxruntime build runs here, and whether its CUDA provider actually loads.

ONNX Runtime's GPU build lists `CUDAExecutionProvider` as *available* even on a machine with
no CUDA libraries (the development box shows it); only a session reveals whether it loads.
So the probe creates a one-node session on CUDA and reads back the providers it got, and it
lists the CUDA libraries the process has loaded (from /proc/self/maps), which says which
libcudart / libcublas / libcudnn ONNX Runtime really uses.

torch is imported first on purpose: its CUDA wheels put libcudart, libcublas and libcudnn in
the process, and the ORT CUDA provider then finds them without LD_LIBRARY_PATH. A process
without torch (`ctr serve`) gets `cuda_library_path()` as LD_LIBRARY_PATH instead.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from loadtest.gpu.config import CPU, CUDA

_SMI_FIELDS = ("name", "driver_version", "memory.total", "compute_cap")
_LIBRARIES = re.compile(r"/\S*lib(cudart|cublas|cublasLt|cudnn|cufft|curand|onnxruntime\S*)\.so\S*")


def nvidia_smi() -> dict[str, Any] | None:
    """The first GPU as nvidia-smi reports it; None without nvidia-smi or a GPU."""
    if shutil.which("nvidia-smi") is None:
        return None
    query = ["nvidia-smi", f"--query-gpu={','.join(_SMI_FIELDS)}", "--format=csv,noheader"]
    done = subprocess.run(query, capture_output=True, text=True, timeout=30, check=False)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return {"error": (done.stderr or done.stdout).strip()[:500]}
    values = [v.strip() for v in lines[0].split(",")]
    info: dict[str, Any] = dict(zip(_SMI_FIELDS, values, strict=False))
    info["gpus"] = len(lines)
    header = subprocess.run(
        ["nvidia-smi"], capture_output=True, text=True, timeout=30, check=False
    ).stdout
    found = re.search(r"CUDA Version:\s*([\d.]+)", header)
    info["driver_cuda"] = found.group(1) if found else None  # the newest CUDA the driver runs
    return info


def torch_info() -> dict[str, Any]:
    import torch

    cuda = torch.cuda.is_available()
    return {
        "version": torch.__version__,
        "cuda": torch.version.cuda,  # the CUDA runtime torch was built with
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "cuda_available": cuda,
        "device": torch.cuda.get_device_name(0) if cuda else None,
    }


def _probe_model() -> bytes:
    """A one-node ONNX graph (y = x + x) to open a session with."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def cuda_session_providers(quiet: bool) -> list[str]:
    """The providers a session asked for [CUDA, CPU] really got ([CPU] when CUDA fails).
    ORT logs why CUDA failed to stderr, the diagnosis on a GPU host; `quiet` silences it where
    no GPU is expected (the dry run)."""
    import onnxruntime as ort

    ort.set_default_logger_severity(4 if quiet else 2)
    try:
        session = ort.InferenceSession(_probe_model(), providers=[CUDA, CPU])
    finally:
        ort.set_default_logger_severity(2)
    return list(session.get_providers())


def loaded_libraries() -> list[str]:
    """CUDA and ONNX Runtime shared libraries mapped into this process (Linux)."""
    maps = Path("/proc/self/maps")
    if not maps.is_file():
        return []
    return sorted({m.group(0) for m in _LIBRARIES.finditer(maps.read_text())})


def onnxruntime_info(quiet: bool) -> dict[str, Any]:
    import onnxruntime as ort

    build: dict[str, Any] = {}
    try:
        from onnxruntime.capi import build_and_package_info as info

        build = {k: getattr(info, k) for k in ("package_name", "cuda_version") if hasattr(info, k)}
    except ImportError:
        pass
    providers = cuda_session_providers(quiet)
    return {
        "version": ort.__version__,
        "file": ort.__file__,
        "device": ort.get_device(),
        "build": build,
        "available_providers": ort.get_available_providers(),
        "cuda_session_providers": providers,
        "cuda_usable": providers[0] == CUDA,
        "loaded_libraries": loaded_libraries(),
    }


def cuda_library_path() -> str:
    """LD_LIBRARY_PATH for a child without torch: the lib folders of the `nvidia-*` wheels
    (cuDNN, cuBLAS, the CUDA runtime) that this Python has, then the inherited value."""
    spec = importlib.util.find_spec("nvidia")
    roots = [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
    folders = sorted(
        {str(lib) for root in roots for lib in root.glob("**/lib") if any(lib.glob("*.so*"))}
    )
    return os.pathsep.join(filter(None, [*folders, os.environ.get("LD_LIBRARY_PATH", "")]))


def probe(dry_run: bool) -> dict[str, Any]:
    """Everything step 1 reports. torch first (see the module docstring)."""
    torch = torch_info()
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "gpu": nvidia_smi(),
        "torch": torch,
        "onnxruntime": onnxruntime_info(quiet=dry_run),
        "cuda_library_path": cuda_library_path(),
    }
