"""Neural Click Models for slate sessions (MODELS.md §3, §4.3): data, user state, the model
family, the training task and the slate metrics."""
