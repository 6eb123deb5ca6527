"""Python SDK for the Distillery API.

::

    from distillery_client import Client

    with Client() as client:  # DISTILLERY_URL, DISTILLERY_API_KEY
        teacher = client.models.upload("teacher.pt", name="digits-teacher")
        data = client.datasets.upload("digits.npz", name="digits", format="npz")
        job = client.jobs.create(teacher_model_id=teacher.id, dataset_id=data.id,
                                 student={"family": "mlp", "hidden": [32]})
        job = client.jobs.wait(job.id, progress=True)
        for art in client.jobs.artifacts(job.id):
            client.artifacts.download(art, "out/")
"""

from distillery_client._client import AsyncClient, Client
from distillery_client._http import RetryPolicy
from distillery_client._version import __version__
from distillery_client.errors import (
    APIConnectionError, APIError, APITimeoutError, AuthenticationError, ChecksumMismatch, ConflictError,
    DistilleryError, FieldError, JobCancelled, JobFailed, NotFoundError, PayloadTooLargeError, PermissionDeniedError,
    RateLimitError, ServerError, ValidationError, WaitTimeout,
)
from distillery_client.types import (
    Artifact, Dataset, Event, Job, JobError, MetricPoint, Model, Progress, Webhook, WebhookDelivery, WebhookTest,
)

__all__ = [
    "APIConnectionError", "APIError", "APITimeoutError", "Artifact", "AsyncClient", "AuthenticationError",
    "ChecksumMismatch", "Client", "ConflictError", "Dataset", "DistilleryError", "Event", "FieldError", "Job",
    "JobCancelled", "JobError", "JobFailed", "MetricPoint", "Model", "NotFoundError", "PayloadTooLargeError",
    "PermissionDeniedError", "Progress", "RateLimitError", "RetryPolicy", "ServerError", "ValidationError",
    "WaitTimeout", "Webhook", "WebhookDelivery", "WebhookTest", "__version__",
]
