"""fleetwatch.kubelet: vendored Kubernetes kubelet APIs the agent reads (not part of fleetwatch's wire contract)."""
