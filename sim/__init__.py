"""Simulated GPUs: a pynvml-compatible fake NVML over a simulated node with fault injection."""
