"""The agent's failures as Python exceptions.

Every failed call raises a :class:`ModeldError` subclass chosen by the gRPC status
code (:class:`NotFoundError`, :class:`InvalidArgumentError`, ...). The agent attaches a
``google.rpc.Status`` to its errors (the ``grpc-status-details-bin`` trailer) holding a
``google.rpc.ErrorInfo`` (domain ``modeld``) whose ``reason`` programs switch on, e.g.
``MODEL_NOT_FOUND``, ``MODEL_NOT_READY`` or ``MEMORY_EXHAUSTED``, with facts in its
``metadata``; and for a field at fault a ``google.rpc.BadRequest``. Both are unpacked
onto the exception.
"""

from __future__ import annotations

from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Type

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

__all__ = [
    "ModeldError",
    "FieldViolation",
    "CancelledError",
    "UnknownError",
    "InvalidArgumentError",
    "DeadlineExceededError",
    "NotFoundError",
    "AlreadyExistsError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "FailedPreconditionError",
    "AbortedError",
    "OutOfRangeError",
    "UnimplementedError",
    "InternalError",
    "UnavailableError",
    "DataLossError",
    "UnauthenticatedError",
    "from_rpc_error",
    "from_status",
]

STATUS_DETAILS_KEY = "grpc-status-details-bin"
REQUEST_ID_KEY = "x-request-id"

# The detail messages google.rpc defines; others stay as packed Any.
_DETAIL_TYPES = [
    error_details_pb2.ErrorInfo,
    error_details_pb2.BadRequest,
    error_details_pb2.RetryInfo,
    error_details_pb2.DebugInfo,
    error_details_pb2.QuotaFailure,
    error_details_pb2.PreconditionFailure,
    error_details_pb2.ResourceInfo,
    error_details_pb2.RequestInfo,
    error_details_pb2.Help,
    error_details_pb2.LocalizedMessage,
]


class FieldViolation(NamedTuple):
    """A request field the agent refused (``google.rpc.BadRequest.FieldViolation``)."""

    field: str
    description: str


class ModeldError(Exception):
    """A call the agent (or the transport) failed.

    Attributes:
        code: the gRPC status code.
        message: the status message, for a person.
        reason: the ErrorInfo reason (e.g. ``"MODEL_NOT_FOUND"``); ``""`` when the
            status carried none (a transport failure, or a status from a proxy).
        domain: the ErrorInfo domain, ``"modeld"`` for the agent's own errors.
        metadata: the ErrorInfo facts, e.g. ``{"model_id": "smol"}``.
        field_violations: the BadRequest fields at fault, e.g.
            ``[FieldViolation("sampling.temperature", "9 is outside [0, 5]")]``.
        details: every detail message of the status, unpacked where google.rpc
            defines its type.
        request_id: the ``x-request-id`` the agent answered with (its log lines for
            this call carry it), when it sent one.
    """

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        code: Optional[grpc.StatusCode] = None,
        reason: str = "",
        domain: str = "",
        metadata: Optional[Dict[str, str]] = None,
        field_violations: Sequence[FieldViolation] = (),
        details: Sequence[Any] = (),
        request_id: Optional[str] = None,
    ) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message
        self.reason = reason
        self.domain = domain
        self.metadata: Dict[str, str] = dict(metadata or {})
        self.field_violations: List[FieldViolation] = list(field_violations)
        self.details: List[Any] = list(details)
        self.request_id = request_id

    def __reduce__(self) -> Tuple[Any, ...]:
        # Keyword-only fields: pickle (multiprocessing, concurrent.futures) rebuilds
        # the exception through _rebuild rather than through __init__(*args).
        fields = {
            "code": self.code,
            "reason": self.reason,
            "domain": self.domain,
            "metadata": self.metadata,
            "field_violations": [tuple(v) for v in self.field_violations],
            "details": [],  # protobuf messages need not pickle; the fields above say it all
            "request_id": self.request_id,
        }
        return (_rebuild, (type(self), self.message, fields))

    def __str__(self) -> str:
        name = self.code.name if isinstance(self.code, grpc.StatusCode) else str(self.code)
        head = f"{name}: {self.message}"
        return f"{head} [{self.reason}]" if self.reason else head

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(code={self.code.name}, reason={self.reason!r}, "
            f"message={self.message!r}, metadata={self.metadata!r}, "
            f"field_violations={self.field_violations!r})"
        )


def _rebuild(cls: Type[ModeldError], message: str, fields: Dict[str, Any]) -> ModeldError:
    fields["field_violations"] = [FieldViolation(*v) for v in fields["field_violations"]]
    return cls(message, **fields)


class CancelledError(ModeldError):
    code = grpc.StatusCode.CANCELLED


class UnknownError(ModeldError):
    code = grpc.StatusCode.UNKNOWN


class InvalidArgumentError(ModeldError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceededError(ModeldError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFoundError(ModeldError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(ModeldError):
    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDeniedError(ModeldError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhaustedError(ModeldError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPreconditionError(ModeldError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class AbortedError(ModeldError):
    code = grpc.StatusCode.ABORTED


class OutOfRangeError(ModeldError):
    code = grpc.StatusCode.OUT_OF_RANGE


class UnimplementedError(ModeldError):
    code = grpc.StatusCode.UNIMPLEMENTED


class InternalError(ModeldError):
    code = grpc.StatusCode.INTERNAL


class UnavailableError(ModeldError):
    code = grpc.StatusCode.UNAVAILABLE


class DataLossError(ModeldError):
    code = grpc.StatusCode.DATA_LOSS


class UnauthenticatedError(ModeldError):
    code = grpc.StatusCode.UNAUTHENTICATED


_BY_CODE: Dict[grpc.StatusCode, Type[ModeldError]] = {
    cls.code: cls
    for cls in (
        CancelledError,
        UnknownError,
        InvalidArgumentError,
        DeadlineExceededError,
        NotFoundError,
        AlreadyExistsError,
        PermissionDeniedError,
        ResourceExhaustedError,
        FailedPreconditionError,
        AbortedError,
        OutOfRangeError,
        UnimplementedError,
        InternalError,
        UnavailableError,
        DataLossError,
        UnauthenticatedError,
    )
}
_BY_NUMBER: Dict[int, grpc.StatusCode] = {c.value[0]: c for c in grpc.StatusCode}


def _unpack(detail: any_pb2.Any) -> Any:
    for cls in _DETAIL_TYPES:
        if detail.Is(cls.DESCRIPTOR):
            message = cls()
            detail.Unpack(message)
            return message
    return detail


def from_status(
    code: grpc.StatusCode,
    message: str,
    details: Sequence[Any] = (),
    request_id: Optional[str] = None,
) -> ModeldError:
    """The exception for a status with its (unpacked or packed) detail messages."""
    unpacked = [_unpack(d) if isinstance(d, any_pb2.Any) else d for d in details]
    reason, domain, metadata = "", "", {}
    violations: List[FieldViolation] = []
    for d in unpacked:
        if isinstance(d, error_details_pb2.ErrorInfo) and not reason:
            reason, domain, metadata = d.reason, d.domain, dict(d.metadata)
        elif isinstance(d, error_details_pb2.BadRequest):
            violations += [FieldViolation(v.field, v.description) for v in d.field_violations]
    cls = _BY_CODE.get(code, ModeldError)
    return cls(
        message,
        code=code,
        reason=reason,
        domain=domain,
        metadata=metadata,
        field_violations=violations,
        details=unpacked,
        request_id=request_id,
    )


def _metadata(call: Any, method: str) -> Tuple[Tuple[str, Any], ...]:
    getter = getattr(call, method, None)
    if getter is None:
        return ()
    try:
        return tuple(getter() or ())
    except Exception:  # a call that never started has none
        return ()


def from_rpc_error(error: grpc.RpcError) -> ModeldError:
    """The exception for a failed grpcio call (an ``RpcError`` that is also a ``Call``)."""
    code_fn = getattr(error, "code", None)
    code = code_fn() if callable(code_fn) else grpc.StatusCode.UNKNOWN
    details_fn = getattr(error, "details", None)
    message = (details_fn() if callable(details_fn) else None) or str(error)
    trailing = _metadata(error, "trailing_metadata")
    initial = _metadata(error, "initial_metadata")
    request_id = next((str(v) for k, v in initial + trailing if k == REQUEST_ID_KEY), None)
    details: List[Any] = []
    for key, value in trailing:
        if key != STATUS_DETAILS_KEY:
            continue
        status = status_pb2.Status.FromString(value)
        # A status whose code disagrees with the call's is not about this call.
        if status.code == code.value[0]:
            details = list(status.details)
            message = status.message or message
        break
    return from_status(code, message, details, request_id)


def from_summary_error(code: int, reason: str, message: str) -> ModeldError:
    """The exception for a Generate that ended with finish reason ERROR."""
    status_code = _BY_NUMBER.get(code, grpc.StatusCode.UNKNOWN)
    cls = _BY_CODE.get(status_code, ModeldError)
    return cls(message, code=status_code, reason=reason, domain="modeld" if reason else "")
