"""fleetwatch.prompb: generated protobuf modules of Prometheus's remote-write 1.0 messages.

Vendored from Prometheus (SOURCE.md beside this file): the collector forwards its time series to
remote-write receivers as a prometheus.WriteRequest (fleetwatch.collector.remote_write).
"""
