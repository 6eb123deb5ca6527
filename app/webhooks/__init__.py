"""Webhooks (Standard Webhooks): tenants' endpoints, the delivery outbox written with every job transition,
and the sender the leading worker runs.

policy.py    which URLs an endpoint may have and which address a delivery connects to (SSRF rules)
signing.py   secrets and the ``webhook-signature`` header
schedule.py  when a failed delivery is tried again
outbox.py    delivery rows written in the caller's transaction (a job's transition, a test event)
delivery.py  claim due deliveries, send one attempt, record its outcome
service.py   endpoints and their deliveries for the API (tenant-scoped)
metrics.py   the ``/metrics`` series of deliveries and attempts
"""
