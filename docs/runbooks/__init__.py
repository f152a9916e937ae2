"""Runbook pages, one markdown file per detector, served by the collector at /runbooks/<detector>.

A package only so that the pages install with fleetwatch; it holds no code.
"""
