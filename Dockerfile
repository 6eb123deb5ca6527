# One image for the API and the worker; the command chooses the role.
# CPU build by default; for GPU workers build with TORCH_INDEX=https://download.pytorch.org/whl/cu128.
FROM python:3.11-slim
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 DISTILLERY_DATA_DIR=/data
WORKDIR /srv
# bubblewrap isolates everything that opens a tenant's file (docs/security.md); DISTILLERY_SANDBOX=bwrap
# below makes a missing or blocked bwrap a start-up error instead of a silent downgrade.
RUN apt-get update && apt-get install -y --no-install-recommends bubblewrap && rm -rf /var/lib/apt/lists/*
ENV DISTILLERY_SANDBOX=bwrap
COPY pyproject.toml README.md alembic.ini ./
COPY app ./app
COPY worker ./worker
COPY engine ./engine
COPY jobspec ./jobspec
COPY safezip ./safezip
COPY migrations ./migrations
# The 'mlflow' extra: workers log tracked jobs to DISTILLERY_MLFLOW_TRACKING_URI (docs/integration.md#mlflow).
RUN pip install --extra-index-url "$TORCH_INDEX" "torch==2.13.0" && pip install ".[mlflow]"
VOLUME ["/data"]
EXPOSE 8000
CMD ["distillery", "serve"]
