"""units.py turns systemd units into the guest's script as systemd would run them, or refuses."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.guest.units import expand, parse_env_file, parse_service, script

DEPLOY = Path(__file__).resolve().parent.parent.parent / "deploy" / "vm"


def test_expand_follows_systemd() -> None:
    env = {"AREA": "vm1", "OPTS": "-a  -b"}
    assert expand("/bin/x ${AREA} --n=${AREA}x $OPTS '$$AREA' \"a b\"", env) == [
        "/bin/x", "vm1", "--n=vm1x", "-a", "-b", "$AREA", "a b",
    ]  # fmt: skip
    # $NAME inside a word is left alone, as systemd leaves it (for the shell it may run)
    assert expand("/bin/sh -c 'for i in $(seq 3); do :; done'", env) == [
        "/bin/sh", "-c", "for i in $(seq 3); do :; done",
    ]  # fmt: skip
    for unsupported in ("-/bin/x", "/bin/x %i"):
        with pytest.raises(ValueError):
            expand(unsupported, env)


def test_an_unknown_directive_is_refused(tmp_path: Path) -> None:
    unit = tmp_path / "x.service"
    unit.write_text("[Service]\nExecStart=/bin/true\nMemoryMax=1G\n")
    with pytest.raises(ValueError, match="MemoryMax"):
        parse_service(unit)


def test_the_shipped_units_become_a_script() -> None:
    env = parse_env_file((DEPLOY / "nbd.env.example").read_text())
    nbd = parse_service(DEPLOY / "netswap-nbd.service")
    assert nbd.type == "simple" and nbd.oom_score_adjust == -1000 and nbd.limit_memlock == "infinity"
    assert nbd.runtime_directory == "netswap" and nbd.runtime_directory_mode == "0700"
    # the continuation line is part of the command
    (start,) = nbd.commands["ExecStart"]
    assert expand(start, env)[-2:] == ["--retry-deadline", env["NETSWAP_RETRY_DEADLINE"]]
    text = script(
        [DEPLOY / "netswap-nbd.service", DEPLOY / "netswap-swap.service"], "/etc/netswap/nbd.env", env
    )
    assert "start_netswap_nbd() {" in text and "start_netswap_swap() {" in text
    assert f"-N {env['NETSWAP_AREA']} -swap" in text
    with pytest.raises(ValueError, match=r"reads /etc/netswap/nbd\.env"):
        script([DEPLOY / "netswap-nbd.service"], "/elsewhere.env", env)
