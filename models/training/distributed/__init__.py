"""Data-parallel training with `torch.distributed`: ranks and collectives, the `torchrun`
launcher behind `ctr train --nproc`, and stop requests (SIGTERM) that every rank agrees on."""
