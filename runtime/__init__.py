"""The serving runtime that the exporters and the service share, without torch.

`features` (feature spec and vocabularies), `repository` (model-directory reader and
verifier), `feeds` and `slate_feeds` (raw ids -> ONNX Runtime feeds), `loader` (a verified
model directory opened in ONNX Runtime). Imports numpy and onnxruntime, never torch, `models`,
`exporters` or `service` (tests/test_layout.py checks it). Importing this package imports
nothing.
"""
