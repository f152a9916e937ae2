"""Silences without Alertmanager: what a silence request may hold, checked before it is stored.

A silence names a node and, optionally, one of its GPUs and one detector; alerts it covers are
recorded and shown (with silenced_by) but their deliveries are held back while it is active.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from fleetwatch.limits import MAX_GPUS_PER_NODE, node_name_problem

# Longest silence: an RMA rarely takes longer, and a forgotten silence should not hide a GPU for ever.
MAX_SILENCE_SECONDS = 90 * 86400
COMMENT_MAX_CHARS = 1000
CREATED_BY_MAX_CHARS = 255
_KEYS = ("node", "gpu", "detector", "seconds", "starts_at", "comment", "created_by")


def parse_silence(body: Any, now: float, *, known_detectors: Sequence[str]) -> dict[str, Any]:
    """The store's silence fields from a request body; ValueError naming the field that is wrong."""
    if not isinstance(body, Mapping):
        raise ValueError("the body must be a JSON object")
    unknown = sorted(set(body) - set(_KEYS))
    if unknown:
        raise ValueError(f"unknown field {unknown[0]!r} (fields: {', '.join(_KEYS)})")
    node = body.get("node")
    if not isinstance(node, str) or not node:
        raise ValueError("node: required, the node's name as `fleetwatchctl status` shows it")
    problem = node_name_problem(node)
    if problem:
        raise ValueError(f"node: {problem}")
    gpu = body.get("gpu")
    if gpu is not None and (isinstance(gpu, bool) or not isinstance(gpu, int) or not 0 <= gpu < MAX_GPUS_PER_NODE):
        raise ValueError(f"gpu: must be a GPU index, 0-{MAX_GPUS_PER_NODE - 1}")
    detector = body.get("detector")
    if detector is not None and detector not in known_detectors:
        raise ValueError(f"detector: {str(detector)[:64]!a} is not one of {', '.join(sorted(known_detectors))}")
    seconds = _number(body, "seconds")
    if seconds is None or not 0 < seconds <= MAX_SILENCE_SECONDS:
        raise ValueError(f"seconds: required, how long the silence lasts (more than 0, at most {MAX_SILENCE_SECONDS})")
    starts_at = _number(body, "starts_at")
    starts_at = now if starts_at is None else starts_at
    comment = body.get("comment")
    if not isinstance(comment, str) or not comment.strip():
        raise ValueError("comment: required, why the alerts are silenced (an RMA ticket, a maintenance window)")
    if len(comment) > COMMENT_MAX_CHARS:
        raise ValueError(f"comment: at most {COMMENT_MAX_CHARS} characters")
    created_by = body.get("created_by") or ""
    if not isinstance(created_by, str) or len(created_by) > CREATED_BY_MAX_CHARS:
        raise ValueError(f"created_by: a name of at most {CREATED_BY_MAX_CHARS} characters")
    return {
        "node": node,
        "gpu": gpu,
        "detector": detector,
        "starts_at": starts_at,
        "ends_at": starts_at + seconds,
        "comment": comment.strip(),
        "created_by": created_by,
    }


def _number(body: Mapping[str, Any], name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}: must be a number")
    return float(value)


def silence_text(silence: Mapping[str, Any]) -> str:
    """What a silence covers, for logs: node n01 gpu 3 detector xid ("RMA 123")."""
    parts = [f"node {silence['node']}"]
    if silence.get("gpu") is not None:
        parts.append(f"gpu {silence['gpu']}")
    if silence.get("detector"):
        parts.append(f"detector {silence['detector']}")
    return " ".join(parts) + f" ({silence['comment']!r})"
