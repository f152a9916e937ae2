"""fleetwatch.kubelet.podresources: the kubelet's pod-resources API, by version."""
