"""Celery worker: load a job, run the engine, record the result. Imports app (db, jobs, storage) and engine."""
