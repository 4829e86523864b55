"""Server settings are validated before anything binds."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from moduleserve.server.cli import main
from moduleserve.server.config import ServerSettings


@pytest.mark.parametrize(
    ("values", "sentence"),
    [
        ({"host": "0.0.0.0"}, "refusing to listen on 0.0.0.0 without tokens"),
        ({"host": "0.0.0.0", "tokens": [""]}, "tokens must not be empty"),
        ({"tokens": ["  "]}, "tokens must not be empty"),
        ({"tls_cert": "cert.pem"}, "tls_cert and tls_key go together"),
        ({"device": "cpu", "dtype": "float16"}, "needs a CUDA device"),
        ({"batching": {"max_batch_size": 0}}, "greater than 0"),
    ],
)
def test_bad_settings_are_refused_with_a_sentence(values: dict[str, object], sentence: str) -> None:
    with pytest.raises(ValidationError, match=sentence):
        ServerSettings(**values)


def test_a_public_address_with_a_token_is_accepted() -> None:
    assert ServerSettings(host="0.0.0.0", tokens=["secret"]).tokens == ["secret"]


def test_cli_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--workers", "0"]) == 2
    assert "--workers must be at least 1" in capsys.readouterr().err
    assert main(["--device", "tpu", "--grpc-port", "0"]) == 2
    assert "device 'tpu'" in capsys.readouterr().err
