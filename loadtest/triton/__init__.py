"""The benchmark peer: NVIDIA Triton (PyTriton) serving the same ONNX model, in its own venv."""
