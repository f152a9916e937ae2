"""fleetwatch collector: gRPC ingest, storage, detection loop, alerts, HTTP API and the ctl CLI."""
