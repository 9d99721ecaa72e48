"""Training and evaluation: the loop (`loop`), `ctr train` (`run`), the behaviour task, run
directories (`checkpoint`), `ctr evaluate` and the offline metrics."""
