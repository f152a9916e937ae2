"""fleetwatch.v1: generated protobuf and gRPC modules for the v1 wire contract."""
