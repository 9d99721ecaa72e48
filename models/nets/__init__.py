"""The behaviour CTR networks: the model contract (`base`), SARN, FAT, the baselines (DIN,
GRU, Wide&Deep), their shared layers, FAT's hyper-network and the multi-task towers."""
