"""The one DRF exception handler: every error leaves the API as JSON with a ``code``.

- ``ApplianceError`` (a service refused): ``{"code", "detail"}`` plus ``{field: [message]}``
  when one input is to blame, with the error's own status (400, 409, ...).
- Validation errors (DRF's, or Django's from a service's ``full_clean``): 400 with
  ``{field: [message, ...]}`` as DRF renders them.
- Everything else DRF knows (401, 403, 404, 405, 415, ...): ``{"detail", "code"}``.
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError as DjangoValidationError
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.serializers import as_serializer_error
from rest_framework.views import exception_handler as drf_exception_handler

from appliance.errors import ApplianceError


class LengthRequired(exceptions.APIException):
    status_code = status.HTTP_411_LENGTH_REQUIRED
    default_detail = "send the raw image with a Content-Length header (no chunked encoding)"
    default_code = "length_required"


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    if isinstance(exc, ApplianceError):
        body: dict[str, Any] = {"code": exc.code, "detail": exc.message}
        if exc.field:
            body[exc.field] = [exc.message]
        return Response(body, status=exc.status)
    if isinstance(exc, DjangoValidationError):
        exc = exceptions.ValidationError(as_serializer_error(exc))
    response = drf_exception_handler(exc, context)
    if response is not None and isinstance(response.data, dict):
        detail = response.data.get("detail")
        if detail is not None and "code" not in response.data:
            response.data["code"] = getattr(detail, "code", None) or "error"
    return response
