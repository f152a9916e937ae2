"""Notifiers: one module per alert destination."""
