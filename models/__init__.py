"""Offline half of SlateCTR, in PyTorch: `data` (sample files, loaders), `simulate` (a world
with known ground truth), `nets` (the behaviour models), `ncm` (slate click models),
`training` (loop, `ctr train`, `ctr evaluate`), `bench` (quality benchmarks), plus the model
name `registry` and `--set` `overrides`. The feature contract lives in `runtime.features`.
Importing this package imports nothing.
"""
