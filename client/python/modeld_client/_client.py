"""The client: one gRPC channel to an agent, and the common flows over it."""

from __future__ import annotations

import os
import posixpath
import re
import threading
from dataclasses import dataclass
from typing import (
    Any,
    Callable,
    Generic,
    Iterator,
    List,
    Mapping,
    NamedTuple,
    Optional,
    Sequence,
    Tuple,
    TypeVar,
    Union,
)
from urllib.parse import urlparse

import grpc
from google.protobuf import duration_pb2

from .errors import CancelledError, UnknownError, from_rpc_error, from_summary_error
from .v1 import (
    generate_pb2,
    generate_pb2_grpc,
    lifecycle_pb2,
    lifecycle_pb2_grpc,
    model_pb2,
    node_pb2,
    node_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
    storage_pb2_grpc,
)

PathOrPem = Union[str, bytes, "os.PathLike[str]"]
"""PEM text as bytes (or a str holding ``-----BEGIN``), else the path of a PEM file."""

ChatInput = Union[
    generate_pb2.ChatMessage,
    Tuple[str, str],
    Mapping[str, str],
]
"""A chat message: ``("user", "Hi")``, ``{"role": "user", "content": "Hi"}`` or a
``ChatMessage``. Roles: system, user, assistant, tool."""

DEFAULT_TARGET = "127.0.0.1:7700"
MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # the agent's limit

T = TypeVar("T")
S = TypeVar("S", bound="Stream[Any]")


def _pem(value: Optional[PathOrPem]) -> Optional[bytes]:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value
    if isinstance(value, str) and "-----BEGIN" in value:
        return value.encode()
    with open(value, "rb") as f:
        return f.read()


@dataclass(frozen=True)
class TLS:
    """TLS to the agent.

    Attributes:
        ca: root certificates to check the agent's certificate against (PEM bytes or a
            file path); ``None`` = the system's roots.
        cert, key: a client certificate and its key, for agents that require one
            (``--tls-client-ca``).
        server_name: the name to check the agent's certificate for, when it is not the
            host of the target (e.g. connecting by IP address).
    """

    ca: Optional[PathOrPem] = None
    cert: Optional[PathOrPem] = None
    key: Optional[PathOrPem] = None
    server_name: Optional[str] = None

    def credentials(self) -> grpc.ChannelCredentials:
        if (self.cert is None) != (self.key is None):
            raise ValueError("TLS: a client certificate needs its key, and a key its certificate")
        return grpc.ssl_channel_credentials(
            root_certificates=_pem(self.ca),
            private_key=_pem(self.key),
            certificate_chain=_pem(self.cert),
        )


class Tokens(NamedTuple):
    """What Tokenize answers: the token ids and the text of each."""

    ids: List[int]
    pieces: List[str]


def _enum(enum: Any, prefix: str, value: Union[str, int, None], aliases: Mapping[str, str] = {}) -> Any:
    """An enum value from its number or a forgiving spelling of its name:
    ``"gguf"``, ``"GGUF"``, ``"MODEL_FORMAT_GGUF"``; ``None`` = unspecified."""
    if value is None:
        return 0
    if isinstance(value, int):
        return value
    key = re.sub(r"[^a-z0-9]", "", value.lower())
    key = aliases.get(key, key)
    for name in enum.keys():
        short = re.sub(r"[^a-z0-9]", "", name[len(prefix) :].lower())
        if key in (short, re.sub(r"[^a-z0-9]", "", name.lower())):
            return int(enum.Value(name))
    choices = ", ".join(n[len(prefix) :].lower() for n in enum.keys() if not n.endswith("UNSPECIFIED"))
    raise ValueError(f"unknown {prefix.rstrip('_').lower()} {value!r}; one of: {choices}")


def _runtime(value: Union[str, int, None]) -> Any:
    return _enum(model_pb2.Runtime, "RUNTIME_", value, {"onnx": "onnxruntime", "llama": "llamacpp"})


_EXTENSIONS = {
    ".gguf": "gguf",
    ".onnx": "onnx",
    ".safetensors": "safetensors",
    ".tflite": "tflite",
    ".pte": "executorch",
    ".mlmodel": "coreml",
    ".pllm": "picollm",
}


def _duration(seconds: Optional[float]) -> Optional[duration_pb2.Duration]:
    if seconds is None:
        return None
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(round(seconds * 1e9)))
    return d


def _chat_message(m: ChatInput) -> generate_pb2.ChatMessage:
    if isinstance(m, generate_pb2.ChatMessage):
        return m
    if isinstance(m, tuple):
        role, content = m
    else:
        role, content = m["role"], m["content"]
    return generate_pb2.ChatMessage(role=_enum(generate_pb2.ChatRole, "CHAT_ROLE_", role), content=content)


def _finish_name(value: int) -> str:
    """``FINISH_REASON_STOP`` -> ``"stop"``."""
    return generate_pb2.FinishReason.Name(value)[len("FINISH_REASON_") :].lower()


class Stream(Generic[T]):
    """A server stream: iterate it for its items; ``cancel()`` (from any thread) or
    leaving a ``with`` block ends it early. After a ``cancel()`` the iteration simply
    ends and ``cancelled`` is true; every other failure raises a ModeldError."""

    def __init__(self, call: Any) -> None:
        self._call = call
        self._lock = threading.Lock()
        self._cancel_requested = False
        self.done = False
        """True once the stream has ended (completed, failed or cancelled)."""
        self.cancelled = False
        """True when the stream ended because ``cancel()`` was called."""

    def cancel(self) -> None:
        """Cancels the call: the agent stops the work (a generation, a download nobody
        else waits for) and the iteration ends."""
        with self._lock:
            if self.done:
                return
            self._cancel_requested = True
            self.cancelled = True
            self.done = True
        self._call.cancel()

    def close(self) -> None:
        """Cancels the call if it is still running."""
        self.cancel()

    @property
    def request_id(self) -> Optional[str]:
        """The ``x-request-id`` the agent answered with (waits for its headers)."""
        for key, value in self._call.initial_metadata() or ():
            if key == "x-request-id":
                return str(value)
        return None

    def __enter__(self: S) -> S:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        raise NotImplementedError

    def _next_message(self) -> Any:
        """The next message of the call, or None once it has ended."""
        if self.done:
            return None
        try:
            message = next(self._call)
        except StopIteration:
            self.done = True
            return None
        except grpc.RpcError as e:
            self.done = True
            if self._cancel_requested and e.code() == grpc.StatusCode.CANCELLED:
                return None
            raise from_rpc_error(e) from e
        # cancel() from another thread while this one waited: the stream has ended.
        return None if self._cancel_requested else message


class Watch(Stream[lifecycle_pb2.WatchResponse]):
    """Lifecycle events as they happen: ``WatchResponse`` messages (kind, transition,
    revision). Never ends by itself; ``cancel()`` it or leave its ``with`` block."""

    def __next__(self) -> lifecycle_pb2.WatchResponse:
        message = self._next_message()
        if message is None:
            raise StopIteration
        return message  # type: ignore[no-any-return]


class Loading(Stream[lifecycle_pb2.LoadProgress]):
    """A Load: ``LoadProgress`` messages (state, stage, stage and overall progress,
    message, ETA) until the model is READY; then ``loaded`` holds it."""

    def __init__(self, call: Any) -> None:
        super().__init__(call)
        self.loaded: Optional[lifecycle_pb2.LoadedModel] = None
        """The model, once READY."""
        self._last: Optional[lifecycle_pb2.LoadProgress] = None

    def __next__(self) -> lifecycle_pb2.LoadProgress:
        while True:
            message = self._next_message()
            if message is None:
                if self.loaded is None and not self.cancelled:
                    raise UnknownError("the Load stream ended before the model was ready")
                raise StopIteration
            if message.HasField("loaded"):
                self.loaded = message.loaded
            # The agent repeats the READY progress on the message that carries the
            # model; a progress equal to the last one says nothing new.
            if message.HasField("progress") and message.progress != self._last:
                self._last = message.progress
                return message.progress  # type: ignore[no-any-return]

    def wait(self, on_progress: Optional[Callable[[lifecycle_pb2.LoadProgress], None]] = None) -> lifecycle_pb2.LoadedModel:
        """Reads the stream to its end; returns the loaded model."""
        for progress in self:
            if on_progress is not None:
                on_progress(progress)
        if self.loaded is None:
            raise CancelledError("the Load was cancelled before the model was ready")
        return self.loaded


class Generation(Stream[str]):
    """A streaming Generate: iterating it yields the text of each token as it comes
    (empty pieces, while a multi-byte character is incomplete, are skipped).

    Once it has ended, ``finish_reason`` is ``"stop"``, ``"length"`` or
    ``"cancelled"``, ``usage`` holds the prompt and generated token counts and rates,
    and ``text`` the whole output. A generation that ends with finish reason ERROR
    raises the ModeldError its summary names (reason, code, message). ``cancel()``
    stops it on the agent within a token; iteration then just ends."""

    def __init__(self, call: Any) -> None:
        super().__init__(call)
        self.text = ""
        """The text generated so far."""
        self.tokens: List[generate_pb2.GeneratedToken] = []
        """Every token so far (text, id, logprob when asked for)."""
        self.summary: Optional[generate_pb2.GenerateSummary] = None
        """The final message: finish reason and usage (None until it arrives)."""

    @property
    def finish_reason(self) -> str:
        """``"stop"``, ``"length"``, ``"cancelled"`` or ``"error"``; ``""`` while running."""
        if self.summary is not None:
            return _finish_name(self.summary.finish_reason)
        return "cancelled" if self.cancelled else ""

    @property
    def usage(self) -> Optional[generate_pb2.Usage]:
        """Prompt and generated tokens, time to first token, tokens/s (from the summary)."""
        return self.summary.usage if self.summary is not None else None

    def __next__(self) -> str:
        while True:
            message = self._next_message()
            if message is None:
                if self.summary is None and not self.cancelled:
                    raise UnknownError("the Generate stream ended without its summary")
                raise StopIteration
            if message.HasField("token"):
                token = message.token
                self.tokens.append(token)
                if token.text:
                    self.text += token.text
                    return token.text  # type: ignore[no-any-return]
            elif message.HasField("summary"):
                self.summary = message.summary
                if message.summary.finish_reason == generate_pb2.FINISH_REASON_ERROR:
                    s = message.summary
                    self.done = True
                    raise from_summary_error(s.error_code, s.error_reason, s.error or "generation failed")

    def collect(self) -> str:
        """Reads the generation to its end; returns the whole text."""
        for _ in self:
            pass
        return self.text


class Stubs:
    """The raw grpcio stubs over the client's channel, for what the wrapper does not
    cover. Pass ``metadata=client.metadata`` to send the token; map failures with
    ``modeld_client.errors.from_rpc_error``."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.registry = registry_pb2_grpc.ModelRegistryStub(channel)
        self.lifecycle = lifecycle_pb2_grpc.LifecycleStub(channel)
        self.generate = generate_pb2_grpc.GenerateStub(channel)
        self.node = node_pb2_grpc.NodeStub(channel)
        self.storage = storage_pb2_grpc.StorageStub(channel)


class Client:
    """A connection to one modeld agent.

    Args:
        target: ``host:port``, ``http://host:port`` (plaintext) or
            ``https://host:port`` (TLS, with the system's roots unless ``tls`` says
            otherwise).
        token: a bearer token, sent as ``authorization: Bearer …`` on every call.
        tls: ``TLS(...)`` (CA, client certificate and key), or ``True`` for TLS with
            the system's roots.
        timeout: seconds each unary call may take; streams (load, generate, watch)
            have none unless one is passed to them.
        options: extra grpcio channel options.

    Every method raises a :class:`modeld_client.ModeldError` subclass on failure.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        token: Optional[str] = None,
        tls: Union[TLS, bool, None] = None,
        timeout: Optional[float] = 30.0,
        options: Sequence[Tuple[str, Any]] = (),
    ) -> None:
        address, secure = target, bool(tls)
        if "://" in target:
            url = urlparse(target)
            if url.scheme not in ("http", "https"):
                raise ValueError(f"target {target!r}: the scheme must be http or https")
            if url.scheme == "http" and tls:
                raise ValueError(f"target {target!r} is plaintext (http://) but TLS was asked for")
            address, secure = url.netloc, url.scheme == "https"
        if secure and not isinstance(tls, TLS):
            tls = TLS()
        channel_options: List[Tuple[str, Any]] = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
        if isinstance(tls, TLS) and tls.server_name:
            channel_options.append(("grpc.ssl_target_name_override", tls.server_name))
        channel_options += list(options)
        if secure:
            assert isinstance(tls, TLS)
            self.channel = grpc.secure_channel(address, tls.credentials(), options=channel_options)
        else:
            self.channel = grpc.insecure_channel(address, options=channel_options)
        self.target = address
        self.timeout = timeout
        self.metadata: Tuple[Tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        self.stubs = Stubs(self.channel)

    @classmethod
    def from_env(cls, **kwargs: Any) -> "Client":
        """A client configured as modelctl is: ``MODELD_ADDR`` (default
        ``http://127.0.0.1:7700``), ``MODELD_TOKEN``, ``MODELD_TLS_CA``,
        ``MODELD_CLIENT_CERT`` and ``MODELD_CLIENT_KEY``. Keyword arguments win."""
        env = os.environ
        target = env.get("MODELD_ADDR") or f"http://{DEFAULT_TARGET}"
        kwargs.setdefault("token", env.get("MODELD_TOKEN") or None)
        ca, cert, key = (env.get(k) or None for k in ("MODELD_TLS_CA", "MODELD_CLIENT_CERT", "MODELD_CLIENT_KEY"))
        if "tls" not in kwargs and (ca or cert or key):
            kwargs["tls"] = TLS(ca=ca, cert=cert, key=key)
        return cls(target, **kwargs)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.target!r})"

    # --- plumbing -------------------------------------------------------------

    def _unary(self, method: Any, request: Any, timeout: Optional[float]) -> Any:
        try:
            return method(request, timeout=self.timeout if timeout is None else timeout, metadata=self.metadata)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from e

    def _stream(self, method: Any, request: Any, timeout: Optional[float]) -> Any:
        return method(request, timeout=timeout, metadata=self.metadata)

    # --- node ------------------------------------------------------------------

    def capabilities(self, *, timeout: Optional[float] = None) -> node_pb2.GetCapabilitiesResponse:
        """The node: OS, device class, CPU, memory, accelerators, runtimes, disk."""
        return self._unary(self.stubs.node.GetCapabilities, node_pb2.GetCapabilitiesRequest(), timeout)  # type: ignore[no-any-return]

    # --- registry --------------------------------------------------------------

    def models(
        self,
        *,
        query: str = "",
        format: Union[str, int, None] = None,
        runtime: Union[str, int, None] = None,
        quantization: str = "",
        max_size_bytes: int = 0,
        min_context_length: int = 0,
        timeout: Optional[float] = None,
    ) -> List[model_pb2.Model]:
        """Every registered model matching the filters (all pages)."""
        request = registry_pb2.ListModelsRequest(
            page_size=1000,
            query=query,
            format=_enum(model_pb2.ModelFormat, "MODEL_FORMAT_", format),
            runtime=_runtime(runtime),
            quantization=quantization,
            max_size_bytes=max_size_bytes,
            min_context_length=min_context_length,
        )
        models: List[model_pb2.Model] = []
        while True:
            page = self._unary(self.stubs.registry.ListModels, request, timeout)
            models += page.models
            if not page.next_page_token:
                return models
            request.page_token = page.next_page_token

    def model(self, model_id: str, *, timeout: Optional[float] = None) -> model_pb2.Model:
        """One registered model; NotFoundError (MODEL_NOT_FOUND) when unknown."""
        return self._unary(self.stubs.registry.GetModel, registry_pb2.GetModelRequest(id=model_id), timeout).model  # type: ignore[no-any-return]

    def register(
        self,
        model_id: str,
        urls: Union[str, Sequence[str]],
        *,
        sha256: str,
        size_bytes: int,
        format: Union[str, int, None] = None,
        file_name: Optional[str] = None,
        member: str = "",
        archive: Union[str, int, None] = None,
        timeout: Optional[float] = None,
        **spec: Any,
    ) -> model_pb2.Model:
        """Registers a single-file model (``http(s)://``, ``file://`` or ``modeld://``
        sources, tried in order) and returns it. ``format`` is inferred from the file
        name (``.gguf``, ``.onnx``, …) when not given; ``member`` takes one file out of
        a zip (or wheel) or tar.gz source. Other ``ModelSpec`` fields (``display_name``,
        ``context_length``, ``tags``, …) go in ``spec``. Registering the same spec again
        changes nothing."""
        sources = [urls] if isinstance(urls, str) else list(urls)
        if not sources:
            raise ValueError("register: at least one source URL is needed")
        source = urlparse(sources[0]).path
        name = file_name or posixpath.basename(member or source)
        if format is None:
            format = next((f for ext, f in _EXTENSIONS.items() if name.lower().endswith(ext)), None)
            if format is None:
                raise ValueError(f"register: cannot tell the format of {name!r}; pass format=")
        if member and archive is None:
            lowered = source.lower()
            archive = "tar_gz" if lowered.endswith((".tar.gz", ".tgz")) else "zip"
        file = model_pb2.ModelFile(
            name=name,
            urls=sources,
            sha256=sha256,
            size_bytes=size_bytes,
            member=member,
            archive=_enum(model_pb2.ArchiveFormat, "ARCHIVE_FORMAT_", archive),
        )
        model_spec = model_pb2.ModelSpec(
            id=model_id,
            format=_enum(model_pb2.ModelFormat, "MODEL_FORMAT_", format),
            files=[file],
            **spec,
        )
        return self.register_spec(model_spec, timeout=timeout).model

    def register_spec(self, spec: model_pb2.ModelSpec, *, timeout: Optional[float] = None) -> registry_pb2.RegisterModelResponse:
        """Registers a full ``ModelSpec``; the answer says whether it was new."""
        return self._unary(self.stubs.registry.RegisterModel, registry_pb2.RegisterModelRequest(spec=spec), timeout)  # type: ignore[no-any-return]

    def delete(self, model_id: str, *, timeout: Optional[float] = None) -> None:
        """Removes a model from the registry, with its stored files."""
        self._unary(self.stubs.registry.DeleteModel, registry_pb2.DeleteModelRequest(id=model_id), timeout)

    # --- lifecycle -------------------------------------------------------------

    def load_stream(
        self,
        model_id: str,
        *,
        runtime: Union[str, int, None] = None,
        context_length: int = 0,
        parallel: int = 0,
        threads: int = 0,
        batch_size: int = 0,
        gpu_layers: int = 0,
        use_mmap: Optional[bool] = None,
        use_mlock: bool = False,
        pin: bool = False,
        keep_alive: Optional[float] = None,
        execution_providers: Sequence[str] = (),
        optimization_level: Optional[int] = None,
        timeout: Optional[float] = None,
    ) -> Loading:
        """Starts a Load (pulling the model first if needed) and returns its progress
        stream; ``loaded`` is set once the model is READY. ``keep_alive`` is in seconds
        (0 = unload when idle, negative = never); ``parallel`` is the requests it
        decodes together. Cancelling it (or its deadline passing) cancels the download
        when no other client waits for it."""
        options = lifecycle_pb2.LoadOptions(
            runtime=_runtime(runtime),
            context_length=context_length,
            max_concurrent_requests=parallel,
            threads=threads,
            batch_size=batch_size,
            gpu_layers=gpu_layers,
            use_mlock=use_mlock,
            pin=pin,
            keep_alive=_duration(keep_alive),
            execution_providers=list(execution_providers),
        )
        if use_mmap is not None:
            options.use_mmap = use_mmap
        if optimization_level is not None:
            options.optimization_level = optimization_level
        request = lifecycle_pb2.LoadRequest(model_id=model_id, options=options)
        return Loading(self._stream(self.stubs.lifecycle.Load, request, timeout))

    def load(
        self,
        model_id: str,
        *,
        on_progress: Optional[Callable[[lifecycle_pb2.LoadProgress], None]] = None,
        **options: Any,
    ) -> lifecycle_pb2.LoadedModel:
        """Loads a model (see ``load_stream`` for the options), calling
        ``on_progress`` with each ``LoadProgress``; returns the loaded model."""
        with self.load_stream(model_id, **options) as loading:
            return loading.wait(on_progress)

    def unload(self, model_id: str, *, grace: Optional[float] = None, timeout: Optional[float] = None) -> lifecycle_pb2.UnloadResponse:
        """Unloads a model; running requests get ``grace`` seconds, then are cancelled."""
        request = lifecycle_pb2.UnloadRequest(model_id=model_id, grace=_duration(grace))
        if timeout is None and self.timeout is not None:
            timeout = self.timeout + (30.0 if grace is None else grace)  # the agent's default grace: 30 s
        return self._unary(self.stubs.lifecycle.Unload, request, timeout)  # type: ignore[no-any-return]

    def state(self, model_id: str, *, history_limit: int = 0, timeout: Optional[float] = None) -> lifecycle_pb2.GetStateResponse:
        """A model's state, why it failed, in-flight requests and its transitions."""
        request = lifecycle_pb2.GetStateRequest(model_id=model_id, history_limit=history_limit)
        return self._unary(self.stubs.lifecycle.GetState, request, timeout)  # type: ignore[no-any-return]

    def loaded(self, *, timeout: Optional[float] = None) -> lifecycle_pb2.ListLoadedResponse:
        """The models in memory (runtime, memory, queue, recent speed) and the budget."""
        return self._unary(self.stubs.lifecycle.ListLoaded, lifecycle_pb2.ListLoadedRequest(), timeout)  # type: ignore[no-any-return]

    def watch(self, model_id: str = "", *, since_revision: int = 0, timeout: Optional[float] = None) -> Watch:
        """Lifecycle events of one model (or all): those after ``since_revision``
        replayed first, then live ones, until cancelled."""
        request = lifecycle_pb2.WatchRequest(model_id=model_id, since_revision=since_revision)
        return Watch(self._stream(self.stubs.lifecycle.Watch, request, timeout))

    # --- inference -------------------------------------------------------------

    def generate(
        self,
        model_id: str,
        prompt: Optional[str] = None,
        *,
        messages: Optional[Sequence[ChatInput]] = None,
        max_tokens: int = 0,
        temperature: Optional[float] = None,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        min_p: Optional[float] = None,
        repeat_penalty: Optional[float] = None,
        frequency_penalty: Optional[float] = None,
        presence_penalty: Optional[float] = None,
        penalty_last_n: int = 0,
        seed: Optional[int] = None,
        stop: Sequence[str] = (),
        grammar: str = "",
        logprobs: bool = False,
        truncation: Union[str, int, None] = None,
        ignore_eos: bool = False,
        timeout: Optional[float] = None,
    ) -> Generation:
        """Streams a generation from a raw ``prompt``, or from chat ``messages``
        rendered with the model's template. ``max_tokens`` 0 = until the context is
        full; ``temperature`` 0 = greedy; ``truncation`` ``"keep_start"`` or
        ``"keep_end"`` for prompts longer than the context (default: refuse). A
        ``timeout`` ends the generation on the agent too (DeadlineExceededError)."""
        if (prompt is None) == (messages is None):
            raise ValueError("generate: pass a prompt or messages, not both")
        sampling = generate_pb2.SamplingParams(
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            repeat_penalty=repeat_penalty,
            frequency_penalty=frequency_penalty,
            presence_penalty=presence_penalty,
            penalty_last_n=penalty_last_n,
            seed=seed,
        )
        request = generate_pb2.GenerateRequest(
            model_id=model_id,
            sampling=sampling,
            max_tokens=max_tokens,
            stop=list(stop),
            grammar=grammar,
            logprobs=logprobs,
            truncation=_enum(generate_pb2.Truncation, "TRUNCATION_", truncation),
            ignore_eos=ignore_eos,
        )
        if prompt is not None:
            request.prompt = prompt
        else:
            assert messages is not None
            request.chat.messages.extend(_chat_message(m) for m in messages)
        return Generation(self._stream(self.stubs.generate.Generate, request, timeout))

    def tokenize(
        self,
        model_id: str,
        text: str,
        *,
        add_special_tokens: bool = False,
        parse_special: bool = False,
        timeout: Optional[float] = None,
    ) -> Tokens:
        """The model's tokens for ``text``: ids and the text of each."""
        request = generate_pb2.TokenizeRequest(
            model_id=model_id, text=text, add_special_tokens=add_special_tokens, parse_special=parse_special
        )
        answer = self._unary(self.stubs.generate.Tokenize, request, timeout)
        return Tokens(list(answer.token_ids), list(answer.pieces))

    def detokenize(
        self,
        model_id: str,
        token_ids: Sequence[int],
        *,
        skip_special_tokens: bool = False,
        timeout: Optional[float] = None,
    ) -> str:
        """The text of ``token_ids``."""
        request = generate_pb2.DetokenizeRequest(
            model_id=model_id, token_ids=list(token_ids), skip_special_tokens=skip_special_tokens
        )
        return self._unary(self.stubs.generate.Detokenize, request, timeout).text  # type: ignore[no-any-return]


def state_name(state: int) -> str:
    """``MODEL_STATE_READY`` (8) -> ``"ready"``."""
    return model_pb2.ModelState.Name(state)[len("MODEL_STATE_") :].lower()


def stage_name(stage: int) -> str:
    """``LIFECYCLE_STAGE_DOWNLOAD`` (1) -> ``"download"``."""
    return lifecycle_pb2.LifecycleStage.Name(stage)[len("LIFECYCLE_STAGE_") :].lower()


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
]
