"""Distillery API layer: HTTP, persistence and the job domain. Never imports torch."""

__version__ = "0.1.0"
