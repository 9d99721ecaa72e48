"""The behaviour store (Redis), its circuit breaker, and the embedded redis-server that
`ctr serve` starts when no Redis URL is configured."""
