"""The job domain: spec schema, state machine, service."""
