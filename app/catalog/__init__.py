"""Teacher models and datasets: safe inspection of uploads, registration, listing."""
