"""deploy/vm's systemd units as a shell script, for a guest with no systemd.

The guest must run the units' own commands, so that a change to a unit is a
change to what the test runs. This reads the [Service] sections, substitutes
the environment file's values as systemd does, and emits one busybox-sh
function per unit. It knows the handful of directives the units use and
fails on any other: a directive it does not understand could change what
the unit does.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

# systemd's default PATH for services (merged /usr)
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Directives that change nothing before the swap is on: ordering, docs, and
# what happens at stop or after a failure (the test fails on a failure anyway).
IGNORED = {"Restart", "RestartSec", "RemainAfterExit", "ExecStop"}
EXEC = ("ExecStartPre", "ExecStart", "ExecStartPost")


@dataclass
class Service:
    name: str
    type: str = "simple"
    environment_file: str | None = None
    runtime_directory: str | None = None
    runtime_directory_mode: str = "0755"
    oom_score_adjust: int | None = None
    limit_memlock: str | None = None
    commands: dict[str, list[str]] = field(default_factory=lambda: {k: [] for k in EXEC})


def _logical_lines(text: str) -> list[str]:
    """Lines with backslash continuations joined and comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith(("#", ";"))):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    if pending:
        lines.append(pending)
    return lines


def parse_service(path: Path) -> Service:
    service = Service(path.name)
    section = ""
    for line in _logical_lines(path.read_text()):
        if line.startswith("["):
            section = line.strip("[]")
            continue
        if section != "Service":
            continue
        key, _, value = (s.strip() for s in line.partition("="))
        if key in EXEC:
            service.commands[key].append(value)
        elif key == "Type":
            if value not in ("simple", "oneshot"):
                raise ValueError(f"{path.name}: Type={value} is not supported here")
            service.type = value
        elif key == "EnvironmentFile":
            service.environment_file = value
        elif key == "RuntimeDirectory":
            service.runtime_directory = value
        elif key == "RuntimeDirectoryMode":
            service.runtime_directory_mode = value
        elif key == "OOMScoreAdjust":
            service.oom_score_adjust = int(value)
        elif key == "LimitMEMLOCK":
            service.limit_memlock = value
        elif key not in IGNORED:
            raise ValueError(f"{path.name}: [Service] {key}= is not understood by tests/guest/units.py")
    return service


def parse_env_file(text: str) -> dict[str, str]:
    """KEY=VALUE lines (systemd's EnvironmentFile=, without the quoting the example does not use)."""
    env = {}
    for line in _logical_lines(text):
        key, sep, value = line.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key.strip()):
            raise ValueError(f"not a KEY=VALUE line: {line!r}")
        env[key.strip()] = value.strip()
    return env


def expand(command: str, env: dict[str, str]) -> list[str]:
    """One Exec line as argv, the way systemd expands it: ${NAME} anywhere in a word,
    $NAME as a word of its own (split at whitespace), $$ for a dollar sign."""
    if command[:1] in "-@+!:":
        raise ValueError(f"Exec prefix {command[0]!r} is not supported here: {command}")
    if "%" in command:
        raise ValueError(f"systemd specifiers are not supported here: {command}")
    argv: list[str] = []
    for word in shlex.split(command):
        whole = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        if whole:
            argv += env[whole.group(1)].split()
            continue
        braced = re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", lambda m: env[m.group(1)], word)
        argv.append(braced.replace("$$", "$"))
    return argv


def _exec(service: Service, env: dict[str, str], argv: list[str]) -> str:
    """A shell command running argv as systemd would: clean environment, limits, OOM score."""
    setup = []
    if service.oom_score_adjust is not None:
        setup.append(f"echo {service.oom_score_adjust} >/proc/self/oom_score_adj")
    if service.limit_memlock is not None:
        setup.append(
            f"ulimit -l {'unlimited' if service.limit_memlock == 'infinity' else service.limit_memlock}"
        )
    assignments = [f"PATH={SYSTEMD_PATH}", *(f"{k}={v}" for k, v in env.items())]
    run = shlex.join(["exec", "env", "-i", *assignments, *argv])
    return "(" + " && ".join([*setup, run]) + ")"


def script(units: list[Path], env_path: str, env: dict[str, str]) -> str:
    """Shell functions start_UNIT (in the order given) that do what `systemctl start UNIT` would.

    A simple service's main process runs in the background; its PID is left in
    MAIN_PID_UNIT. A failed command prints UNIT-FAILED and makes the function fail.
    """
    out = [f"# Generated by tests/guest/units.py from {', '.join(u.name for u in units)}."]
    for path in units:
        service = parse_service(path)
        if service.environment_file is not None and service.environment_file != env_path:
            raise ValueError(f"{path.name} reads {service.environment_file}, the test writes {env_path}")
        fn = re.sub(r"\W", "_", path.name.removesuffix(".service"))
        out.append(f"start_{fn}() {{")
        if service.runtime_directory:
            directory = f"/run/{service.runtime_directory}"
            out.append(
                f"\tmkdir -p -m {service.runtime_directory_mode} {directory} && chmod {service.runtime_directory_mode} {directory} || return 1"
            )
        for kind in EXEC:
            if kind == "ExecStart" and service.type == "simple" and len(service.commands[kind]) != 1:
                raise ValueError(f"{path.name}: a simple service has exactly one ExecStart")
            for command in service.commands[kind]:
                argv = expand(command, env)
                line = _exec(service, env, argv)
                if kind == "ExecStart" and service.type == "simple":
                    out.append(f"\t{line} &")
                    out.append(f"\tMAIN_PID_{fn}=$!")
                else:
                    what = shlex.quote(f"{path.name} {kind}={shlex.join(argv)}")
                    out.append(f"\t{line} || {{ echo UNIT-FAILED {what}; return 1; }}")
        out.append("}")
    return "\n".join(out) + "\n"
