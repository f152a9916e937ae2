"""fleetwatch: the wire contract package (generated modules live in fleetwatch.v1)."""
