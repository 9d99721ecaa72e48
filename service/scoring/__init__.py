"""How one model version scores batches: the greedy batcher with its workers and admission
(`batcher`), the per-batch work (`batch`: the history read, encode, ONNX Runtime, split, each
timed) and the unbatched baseline runner (`naive`)."""
