"""The API's resources, one module each; every one serves both clients (see ``_base.Runner``)."""

from distillery_client.resources.artifacts import Artifacts
from distillery_client.resources.datasets import Datasets
from distillery_client.resources.jobs import Jobs
from distillery_client.resources.models import Models
from distillery_client.resources.webhooks import Webhooks

__all__ = ["Artifacts", "Datasets", "Jobs", "Models", "Webhooks"]
