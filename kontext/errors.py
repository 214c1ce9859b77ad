"""The errors the core raises, arranged so that callers can act on them.

Every error the client raises is a `KontextError`. The hierarchy answers the questions a caller
has to answer:

* Should I retry? `is_transient(exc)` says whether waiting and trying the same call again can help
  (throttling, 5xx, dropped connections, a truncated download).
* Should I stop the whole run? `AccountError` (401 and 402) means no other call will succeed either.
* Could I have been charged? `AmbiguousCreateError` means a create may have created a prediction
  even though no response said so: never retry it blindly.
* Which row field is wrong? `InputValidationError` and `APIValidationError` carry field names.

No error message ever contains the API token: the client redacts it from any text it did not
write itself (see `redact`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from kontext.schema import Prediction

REDACTED = "[REDACTED]"


def redact(text: str, secrets: Iterable[str | None]) -> str:
    """Return `text` with every non-empty secret replaced by ``[REDACTED]``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return text


class KontextError(Exception):
    """Base class of every error raised by `kontext`."""


class ConfigurationError(KontextError):
    """The client cannot be built: no token, a malformed base URL, and so on."""


class InputValidationError(KontextError, ValueError):
    """A request input failed validation before anything was sent (nothing was spent).

    Attributes:
        errors: One ``(field, message)`` pair per problem, field names as in the model's schema.
    """

    def __init__(self, errors: list[tuple[str, str]]):
        self.errors = errors
        super().__init__("; ".join(f"{field}: {message}" for field, message in errors))

    @property
    def fields(self) -> list[str]:
        return [field for field, _ in self.errors]


class APIError(KontextError):
    """The API answered with an error status.

    Attributes:
        status_code: The HTTP status.
        title: The problem+json ``title``, if any.
        detail: The problem+json ``detail``, or the start of the body.
        body: The decoded JSON body (redacted), or ``None``.
    """

    def __init__(
        self,
        status_code: int,
        detail: str,
        *,
        title: str | None = None,
        body: Mapping[str, Any] | None = None,
        method: str | None = None,
        path: str | None = None,
    ):
        self.status_code = status_code
        self.title = title
        self.detail = detail
        self.body = dict(body) if body is not None else None
        self.method = method
        self.path = path
        where = f" ({method} {path})" if method and path else ""
        label = f"{title}: " if title and title not in detail else ""
        super().__init__(f"HTTP {status_code}{where}: {label}{detail}".rstrip(": "))


class AccountError(APIError):
    """The account cannot make predictions at all (401, 402): stop the run, do not retry."""


class AuthenticationError(AccountError):
    """401: the token is missing, wrong or revoked."""


class BillingError(AccountError):
    """402: the account needs billing set up or more credit."""


class NotFoundError(APIError):
    """404: no such prediction, model or file (or not visible to this token)."""


class APIValidationError(APIError):
    """422: the API rejected the input. `fields` names the offending inputs (``input.`` stripped)."""

    @property
    def fields(self) -> list[str]:
        fields = []
        for item in (self.body or {}).get("invalid_fields") or []:
            field = str(item.get("field", ""))
            fields.append(field.removeprefix("input."))
        return fields


class ThrottledError(APIError):
    """429: rate limited; nothing was created. `retry_after` is the wait the API asked for (s)."""

    def __init__(self, *args: Any, retry_after: float | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.retry_after = retry_after


class ServerError(APIError):
    """5xx: the API failed. For a create, see `AmbiguousCreateError`."""


class TransportError(KontextError):
    """The request never got a complete response: connect error, reset, read timeout."""


class AmbiguousCreateError(KontextError):
    """A create may or may not have created a prediction (timeout, dropped connection, 5xx).

    Retrying blindly could pay twice. Look the prediction up (`ReplicateClient.find_prediction`)
    or record the row as unknown.

    Attributes:
        input: The input that was sent.
        sent_at: When the create was sent (UTC), to narrow a search of the predictions list.
    """

    def __init__(self, message: str, *, input: Mapping[str, Any], sent_at: Any):
        super().__init__(message)
        self.input = dict(input)
        self.sent_at = sent_at


class PredictionError(KontextError):
    """A prediction ended without a usable output. `prediction` is its last known state."""

    def __init__(self, message: str, prediction: Prediction):
        super().__init__(message)
        self.prediction = prediction


class PredictionFailedError(PredictionError):
    """The model failed (status ``failed``); `prediction.error` says why."""


class PredictionCanceledError(PredictionError):
    """The prediction was canceled (by us, by someone else, or by ``Cancel-After``)."""


class PredictionAbortedError(PredictionError):
    """The prediction was aborted before it started (``Cancel-After`` expired); not billed."""


class PredictionTimeoutError(PredictionError):
    """Our overall deadline passed. `canceled` says whether the cancel request went through."""

    def __init__(self, message: str, prediction: Prediction, *, canceled: bool):
        super().__init__(message, prediction)
        self.canceled = canceled


class OutputExpiredError(PredictionError):
    """The prediction succeeded but its output was removed (retention passed, ``data_removed``)."""


class DownloadError(KontextError):
    """An output could not be downloaded or did not verify. No partial file is left behind."""


class IncompleteDownloadError(DownloadError):
    """The body ended before its Content-Length: transient, the download can be retried."""


class InvalidImageError(DownloadError):
    """The body is not an image of the expected format, or it is larger than allowed."""


_TRANSIENT = (ThrottledError, ServerError, TransportError, IncompleteDownloadError)


def is_transient(exc: BaseException) -> bool:
    """Whether trying the same call again later may succeed.

    True for throttling, 5xx, transport failures and truncated downloads. False for account errors,
    validation errors, 404s, model failures, ambiguous creates (retrying could pay twice) and
    anything that is not a `KontextError`.
    """
    return isinstance(exc, _TRANSIENT)
