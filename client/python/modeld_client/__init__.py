"""modeld-client: the Python client of modeld, the gRPC node agent for edge inference.

    import modeld_client

    with modeld_client.Client("127.0.0.1:7700") as client:
        client.load("smol", on_progress=lambda p: print(f"{p.overall_progress:.0%} {p.message}"))
        reply = client.generate("smol", messages=[("user", "Hi!")], max_tokens=32)
        for text in reply:
            print(text, end="", flush=True)
        print(reply.finish_reason, reply.usage.generated_tokens)

Failures raise :class:`ModeldError` subclasses carrying the agent's ErrorInfo reason.
The raw messages and stubs, generated from modeld's protos when this package was
built, are in ``modeld_client.v1`` (``from modeld_client.v1 import model_pb2``).
"""

from ._client import (
    TLS,
    ChatInput,
    Client,
    Generation,
    Loading,
    PathOrPem,
    Stream,
    Stubs,
    Tokens,
    Watch,
    stage_name,
    state_name,
)
from .errors import (
    AbortedError,
    AlreadyExistsError,
    CancelledError,
    DataLossError,
    DeadlineExceededError,
    FailedPreconditionError,
    FieldViolation,
    InternalError,
    InvalidArgumentError,
    ModeldError,
    NotFoundError,
    OutOfRangeError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
    UnknownError,
)

__version__ = "0.1.0"

__all__ = [
    "Client",
    "TLS",
    "Tokens",
    "Stream",
    "Loading",
    "Generation",
    "Watch",
    "Stubs",
    "ChatInput",
    "PathOrPem",
    "state_name",
    "stage_name",
    "ModeldError",
    "FieldViolation",
    "AbortedError",
    "AlreadyExistsError",
    "CancelledError",
    "DataLossError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "OutOfRangeError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "UnknownError",
]
