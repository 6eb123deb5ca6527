"""Opaque, type-prefixed, roughly time-ordered identifiers (``job_…``, ``mdl_…``)."""

import secrets
import time

PREFIXES = {"model": "mdl", "dataset": "ds", "job": "job", "artifact": "art", "tenant": "ten", "api_key": "key",
            "webhook": "wh", "webhook_delivery": "whd", "webhook_message": "msg"}


def new_id(kind: str) -> str:
    # Millisecond timestamp first so ids sort by creation time; random tail for uniqueness.
    return f"{PREFIXES[kind]}_{int(time.time() * 1000):012x}{secrets.token_hex(8)}"
