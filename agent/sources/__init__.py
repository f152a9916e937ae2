"""Agent data sources: one module per source (NVML, host, ...)."""
