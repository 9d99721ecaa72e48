"""PyTorch -> ONNX export, parity verification, the fp16 variant and writing versioned model
directories (`pipeline`); `bench` is `ctr bench export`. Everything here runs at export time;
the serving side of the contract (reading and opening a model directory) is `runtime`.
Importing this package imports nothing.
"""
