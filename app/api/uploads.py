"""Checks shared by the upload routes."""

from __future__ import annotations

from fastapi import Request

from app.errors import Unprocessable


async def reject_unknown_fields(request: Request, allowed: set[str]) -> None:
    form = await request.form()  # already parsed by FastAPI for the declared fields; cached
    unknown = sorted(set(form.keys()) - allowed)
    if unknown:
        raise Unprocessable(f"unknown form field(s): {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}",
                            code="validation_error",
                            errors=[{"loc": ["body", k], "msg": "Extra inputs are not permitted"} for k in unknown])
