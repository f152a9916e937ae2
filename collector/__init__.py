"""fleetwatch collector: gRPC ingest, storage, detection loop, alerts, HTTP API and /metrics."""
