"""PyTorch -> ONNX export, parity verification and the versioned model repository.

Torch-free modules (the service imports them): `repository`, `loader`, `feeds`,
`slate_feeds`, `cases`. Everything else imports torch and runs at export time only. Importing
this package imports nothing.
"""
