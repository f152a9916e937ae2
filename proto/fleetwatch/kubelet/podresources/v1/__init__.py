"""fleetwatch.kubelet.podresources.v1: generated protobuf and gRPC modules of the kubelet's pod-resources v1 API.

Vendored from Kubernetes (SOURCE.md beside this file): the agent asks the kubelet which pod and
container each GPU is allocated to (fleetwatch.agent.sources.podresources).
"""
