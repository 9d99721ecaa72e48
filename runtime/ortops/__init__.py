"""The `slatectr` ONNX Runtime custom-op library: where it is, whether this process may use it.

The library (`src/slatectr_ops.c`, C only, built by `pip install` as the optional setuptools
Extension `runtime.ortops._slatectr_ops`, see setup.py) holds CPU kernels that fuse the
per-candidate core of a model into one op, so a user's large tensors stay in cache while each
of their candidates is scored (docs/export.md, "Serving layouts"):

* `slatectr::SarnAttentivePool` — SARN's target gate and attentive max-pool over all (i, j);
* `slatectr::DinAttentionPool` — DIN's activation unit and the weighted history sum.

It is never imported as a Python module (it has no `PyInit_` function): `library_path()`
locates the shared object, and ONNX Runtime loads it through
`SessionOptions.register_custom_ops_library`. ORT hands it its API table, so it links against
nothing but libc and needs only the vendored, MIT-licensed ORT C API header to build
(`third_party/onnxruntime/README.md`). A machine without a C compiler installs without it and
serves the pure-ONNX graphs of the same model directory; so does `SLATECTR_ORTOPS=off`.

Torch-free (the serving path imports it).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
from pathlib import Path

LIBRARY_ENV = "SLATECTR_ORTOPS"  # a path: use that library; "off": never use one
ISA_ENV = "SLATECTR_OPS_ISA"  # "sse2": the baseline kernels even on an AVX2 machine (tests)
DOMAIN = "slatectr"
DOMAIN_VERSION = 1  # the opset a graph imports for DOMAIN; bumped with any op's semantics
EXTENSION = "runtime.ortops._slatectr_ops"

__all__ = ["DOMAIN", "DOMAIN_VERSION", "ISA_ENV", "LIBRARY_ENV", "library_path", "library_version"]


def library_path() -> Path | None:
    """The custom-op library to register, or None when there is none to use.

    `$SLATECTR_ORTOPS` decides when set: `off` (or empty) disables the library, any other
    value is the path of a library to use (None if no such file). Otherwise the library that
    `pip install` built beside this package, when the build had a compiler.
    """
    chosen = os.environ.get(LIBRARY_ENV)
    if chosen is not None:
        if chosen.strip().lower() in ("", "off"):
            return None
        path = Path(chosen)
        return path if path.is_file() else None
    spec = importlib.util.find_spec(EXTENSION)
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin)


def library_version(path: Path) -> int | None:
    """The `slatectr` op-set version the library at `path` implements, or None when the file
    is no such library (not loadable, or without the `slatectr_ops_domain_version` symbol).
    ORT does not compare custom-domain versions itself, so the loader does."""
    try:
        entry = ctypes.CDLL(str(path)).slatectr_ops_domain_version
    except (OSError, AttributeError):
        return None
    entry.restype = ctypes.c_int
    return int(entry())
