"""fleetwatch agent: the per-node daemon that samples GPUs and the host and streams to the collector."""
