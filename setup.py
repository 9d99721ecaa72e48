"""The one thing pyproject.toml cannot declare: the optional C extension (runtime/ortops).

`pip install -e .` (`make venv`) and the Dockerfile's `pip install .` compile the ONNX Runtime
custom-op library with the machine's C compiler. Nothing is downloaded and nothing is linked
but libc: ORT hands the library its API table at registration, so the vendored C API header is
all it needs. `optional=True`: where there is no compiler the install still succeeds, without
the library, and the service serves the pure-ONNX graphs (runtime/ortops/__init__.py).
The .so is never imported by Python; `runtime.ortops.library_path()` locates it for ORT.
"""

from setuptools import Extension, setup

ORTOPS = "runtime/ortops"
HEADERS = [
    f"{ORTOPS}/src/sarn_pool_impl.h",
    f"{ORTOPS}/src/din_attention_impl.h",
    f"{ORTOPS}/third_party/onnxruntime/onnxruntime_c_api.h",
    f"{ORTOPS}/third_party/onnxruntime/onnxruntime_ep_c_api.h",
    f"{ORTOPS}/third_party/onnxruntime/onnxruntime_error_code.h",
]

setup(
    ext_modules=[
        Extension(
            "runtime.ortops._slatectr_ops",
            sources=[f"{ORTOPS}/src/slatectr_ops.c"],
            depends=HEADERS,  # rebuilt when a kernel changes; shipped in an sdist
            include_dirs=[f"{ORTOPS}/src", f"{ORTOPS}/third_party/onnxruntime"],
            # -O3, no -ffast-math (NaN handling and summation order stay defined); baseline
            # x86-64 code plus AVX2/FMA kernels chosen at run time (slatectr_ops.c).
            extra_compile_args=["-std=gnu11", "-O3", "-fvisibility=hidden"],
            optional=True,
        )
    ]
)
