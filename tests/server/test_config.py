"""One Config, from flags or NETSWAP_* environment variables."""

from __future__ import annotations

from pathlib import Path

import pytest

from netswap.common.sizes import format_size, parse_size
from netswap.server.config import Config, config_from_args


def test_flags_and_environment() -> None:
    env = {
        "NETSWAP_LISTEN": "unix:/tmp/x.sock",
        "NETSWAP_CAPACITY": "2GiB",
        "NETSWAP_TOKENS": "/etc/t.toml",
    }
    config = config_from_args(["--max-area-size", "512MiB"], env)
    assert config == Config(
        listen="unix:/tmp/x.sock",
        capacity=2 << 30,
        max_area_size=512 << 20,
        tokens=Path("/etc/t.toml"),
    )
    # a flag beats the environment
    assert config_from_args(["--capacity", "4096"], env).capacity == 4096


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--capacity", "1000"], "--capacity must be a positive multiple of 4096"),
        (["--capacity", "lots"], "invalid size 'lots'"),
        (["--max-batch-pages", "0"], "--max-batch-pages must be between 1 and 4096"),
        (["--store", "file:"], "--store file: needs a directory"),
        (["--metrics-listen", "localhost"], "--metrics-listen must be HOST:PORT"),
        (["--metrics-listen", "[::1]:http"], "--metrics-listen must be HOST:PORT"),
    ],
)
def test_bad_flags_say_what_is_wrong(argv: list[str], words: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        config_from_args([*argv, "--tokens", "t.toml"], {})
    assert exit_.value.code == 2
    assert words in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "n"),
    [("4096", 4096), ("4K", 4096), ("64MiB", 64 << 20), ("1 GiB", 1 << 30), ("2t", 2 << 40)],
)
def test_parse_size(text: str, n: int) -> None:
    assert parse_size(text) == n


@pytest.mark.parametrize("text", ["", "1.5GiB", "-1", "1GB", "GiB"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="invalid size"):
        parse_size(text)


def test_format_size() -> None:
    assert [format_size(n) for n in (0, 4096, 3 << 20, 1 << 30, 1000)] == [
        "0B",
        "4KiB",
        "3MiB",
        "1GiB",
        "1000B",
    ]


def test_empty_environment_values_mean_unset() -> None:
    # A container image may set NETSWAP_TLS_CERT; `-e NETSWAP_TLS_CERT=` must undo it.
    env = {
        "NETSWAP_TLS_CERT": "",
        "NETSWAP_TLS_KEY": "",
        "NETSWAP_TOKENS": "/t.toml",
        "NETSWAP_METRICS_LISTEN": "",
    }
    config = config_from_args([], env)
    assert config.tls_cert is None and config.tls_key is None
    assert config.metrics_listen == ""  # here empty means "off", as documented
