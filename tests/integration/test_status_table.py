"""Each row of the error table, triggered through a real server; health stays SERVING."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import grpc
import numpy as np
import pytest

from moduleserve.client.client import ModelClient
from moduleserve.client.errors import ERROR_FOR, ModuleServeError
from moduleserve.registry import errors as registry_errors
from moduleserve.registry import introspect
from moduleserve.registry.api import Registry
from moduleserve.registry.classes import parse_input_spec
from moduleserve.registry.introspect import IntrospectionError
from moduleserve.server import errors as server_errors
from moduleserve.server.status import STATUS_FOR, status_for
from tests.helpers import ServerThread, server_settings
from tests.models import NanHater

TOKEN = "s3cret-token"


@pytest.fixture
def guarded(demo_registry: Registry) -> Iterator[ServerThread]:
    demo_registry.classes.register(
        "NanHater", "tests.models:NanHater", {}, [parse_input_spec("x:float32:-1,2")]
    )
    demo_registry.push("nanhater", NanHater().state_dict(), class_name="NanHater")
    corrupt = demo_registry.checkpoints.resolve("nested")
    path = demo_registry.blobs.path(corrupt.digest)
    path.write_bytes(path.read_bytes()[:-1] + b"\x00")
    server = ServerThread(
        server_settings(
            demo_registry.settings.database_url(), demo_registry.settings.store, tokens=[TOKEN]
        )
    )
    yield server
    server.stop()


def load(token: str | None, model: str = "mynet") -> Callable[[str], None]:
    def call(target: str) -> None:
        with ModelClient(target, token=token) as client:
            client.load(model)

    return call


def infer(model: str, x: np.ndarray) -> Callable[[str], None]:
    def call(target: str) -> None:
        with ModelClient(target) as client:
            client.infer(model, x)

    return call


CASES = [
    ("missing token", load(None), grpc.StatusCode.UNAUTHENTICATED, "authorization: Bearer"),
    ("wrong token", load("nope"), grpc.StatusCode.PERMISSION_DENIED, "not one of"),
    ("corrupt checkpoint", load(TOKEN, "nested"), grpc.StatusCode.DATA_LOSS, "corrupt"),
    ("unknown model", load(TOKEN, "ghost"), grpc.StatusCode.NOT_FOUND, "model 'ghost' not found"),
    (
        "bad input",
        infer("mynet", np.zeros((2, 2), np.float32)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "expected shape",
    ),
    (
        "unexpected failure in forward",
        infer("nanhater", np.full(2, np.nan, np.float32)),
        grpc.StatusCode.INTERNAL,
        "internal error (request id ",
    ),
]


@pytest.mark.parametrize(("case", "call", "code", "sentence"), CASES, ids=[c[0] for c in CASES])
def test_status_rows_through_the_server(
    guarded: ServerThread,
    case: str,
    call: Callable[[str], None],
    code: grpc.StatusCode,
    sentence: str,
) -> None:
    with pytest.raises(ModuleServeError) as err:
        call(guarded.target)
    assert err.value.code == code and sentence in err.value.details
    assert "NaN reached" not in err.value.details  # internal details stay in the log
    with ModelClient(guarded.target, token=TOKEN) as client:
        assert client.health() == "SERVING"
        client.load("mynet")
        assert client.infer("doubler", np.array([2.0], np.float32)).tolist() == [5.0]


def test_internal_errors_carry_a_request_id_the_client_can_quote(guarded: ServerThread) -> None:
    with pytest.raises(ModuleServeError) as err:
        infer("nanhater", np.full(2, np.nan, np.float32))(guarded.target)
    assert err.value.request_id and len(err.value.request_id) >= 8


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (registry_errors.ModelNotFoundError("m"), grpc.StatusCode.NOT_FOUND),
        (registry_errors.VersionNotFoundError("m", "3"), grpc.StatusCode.NOT_FOUND),
        (registry_errors.AlreadyExistsError("taken"), grpc.StatusCode.ALREADY_EXISTS),
        (registry_errors.InvalidNameError("model", "..", "rule"), grpc.StatusCode.INVALID_ARGUMENT),
        (registry_errors.AliasConflictError("m", "a", 1, 2), grpc.StatusCode.ABORTED),
        (registry_errors.VersionInUseError("m", 1, ["a"]), grpc.StatusCode.FAILED_PRECONDITION),
        (
            registry_errors.StateDictMismatchError("C", ["k"], [], []),
            grpc.StatusCode.FAILED_PRECONDITION,
        ),
        (registry_errors.IntegrityError("ab" * 32, "corrupt"), grpc.StatusCode.DATA_LOSS),
        (registry_errors.RegistryUnavailableError("locked"), grpc.StatusCode.UNAVAILABLE),
        (server_errors.ShapeMismatchError("x", [-1, 2], [1, 3]), grpc.StatusCode.INVALID_ARGUMENT),
        (server_errors.QueueFullError("m", 3), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (server_errors.DeadlineExceededError("m"), grpc.StatusCode.DEADLINE_EXCEEDED),
        (server_errors.ModelLoadingError("m"), grpc.StatusCode.UNAVAILABLE),
        (RuntimeError("anything else"), None),
    ],
)
def test_the_table_walks_the_class_hierarchy(
    error: Exception, code: grpc.StatusCode | None
) -> None:
    assert status_for(error) == code


DOMAIN_BASES = (registry_errors.RegistryError, server_errors.ServerError, IntrospectionError)


def domain_errors() -> list[type[Exception]]:
    """Every error class the registry, the server and introspection define, bases excluded."""
    found: list[type[Exception]] = []
    pending = [sub for base in DOMAIN_BASES for sub in base.__subclasses__()]
    while pending:
        cls = pending.pop()
        if cls not in found:
            found.append(cls)
            pending.extend(cls.__subclasses__())
    return sorted(found, key=lambda cls: f"{cls.__module__}.{cls.__qualname__}")


def test_every_domain_error_has_a_status_not_internal() -> None:
    # A new error class without a table entry would reach clients as INTERNAL.
    unmapped = [cls.__qualname__ for cls in domain_errors() if status_for(cls.__new__(cls)) is None]
    assert unmapped == []
    assert len(domain_errors()) > 20  # the walk really found the classes


def test_one_input_error_family_for_registry_and_server() -> None:
    # One INVALID_ARGUMENT entry covers the registry's and the server's input errors.
    family = registry_errors.InvalidInputError
    for cls in (server_errors.InvalidTensorError, server_errors.ShapeMismatchError,
                server_errors.DtypeError, server_errors.ByteCountError):  # fmt: skip
        assert issubclass(cls, family) and issubclass(cls, server_errors.ServerError)
    for cls in (introspect.InvalidPatternError, introspect.InvalidSliceError,
                introspect.TooLargeError):  # fmt: skip
        assert issubclass(cls, family) and cls not in STATUS_FOR
    server_entries = [cls for cls in STATUS_FOR if cls.__module__ == server_errors.__name__]
    assert not any(issubclass(cls, family) for cls in server_entries)
    error = server_errors.InvalidTensorError("x", "is odd")
    assert (str(error), status_for(error)) == (
        "input 'x': is odd",
        grpc.StatusCode.INVALID_ARGUMENT,
    )


def test_every_status_the_server_sends_has_its_client_error() -> None:
    sent = {*STATUS_FOR.values(), grpc.StatusCode.INTERNAL}
    assert sorted(code.name for code in sent - set(ERROR_FOR)) == []
