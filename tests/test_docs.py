"""Every job example in the docs is a valid job body (the docs say they work as written)."""

from __future__ import annotations

import pytest

from tests.support.docs_examples import job_examples

EXAMPLES = job_examples()


def test_the_docs_show_job_examples():
    assert len(EXAMPLES) >= 5, [w for w, _ in EXAMPLES]


@pytest.mark.parametrize("where,body", EXAMPLES, ids=[w for w, _ in EXAMPLES])
def test_job_examples_validate(where, body):
    from jobspec import JobSpec

    JobSpec.model_validate(body)
