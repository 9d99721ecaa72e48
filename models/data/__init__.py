"""Sample files and what reads them: schemas and loaders (`schema`), the event log ->
behaviour samples protocol (`events`), numpy encoding and batching (`dataset`, `batch`)."""
