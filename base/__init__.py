"""fleetwatch: GPU-cluster observability and fault detection.

This package root is the base layer every other layer imports: records, canonical names, NVML bit
constants, config loading, systemd, backoff, addresses and asyncio helpers, plus the stdlib-only
step reporter (`fleetwatch.stepreport`). Layers: fleetwatch.agent, fleetwatch.collector,
fleetwatch.detectors, fleetwatch.sim, fleetwatch.ctl; the wire contract is fleetwatch.v1.
"""

__version__ = "0.2.0"
