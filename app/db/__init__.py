"""Persistence: ORM tables, engine/session factory."""
