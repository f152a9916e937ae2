"""Detectors: one module per detector, pure functions of recent data -> findings."""
