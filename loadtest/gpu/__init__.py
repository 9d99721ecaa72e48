"""`ctr bench gpu`: the GPU scoring path checked end to end in one command (docs/gpu.md).

`check` runs the steps and writes the report; `environment`, `build`, `parity`,
`throughput`, `service` and `targets` are the steps and the verdicts; `bundle` and `parts`
carry the wheels the check needs to an air-gapped host and install them there.
"""
