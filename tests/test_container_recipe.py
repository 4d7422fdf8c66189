"""The image recipe, proved without a Docker engine: deploy/Dockerfile's own install steps,
replayed in a fresh venv, give a server that starts exactly as the image's CMD would."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from netswap.server.devcerts import issue, make_ca
from tests.helpers import free_port, write_tokens

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "deploy" / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def final_stage() -> list[tuple[str, str]]:
    steps = instructions()
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[last_from:]


def exec_form(args: str) -> list[str]:
    assert args.startswith("["), f"not exec form: {args}"
    return [part.strip().strip('"') for part in args.strip("[]").split(",")]


def test_dockerfile_recipe_in_a_fresh_venv(tmp_path: Path) -> None:
    steps = instructions()
    pip_runs = [args for word, args in steps if word == "RUN" and args.startswith("pip ")]
    assert len(pip_runs) == 2, pip_runs  # build the wheels; install them

    # The build context: exactly what the builder stage COPYs.
    src = tmp_path / "src"
    src.mkdir()
    for word, args in steps:
        if word == "COPY" and "--from" not in args:
            *sources, _ = args.split()
            for s in sources:
                path = ROOT / s.rstrip("/")
                if path.is_dir():
                    shutil.copytree(path, src / s.rstrip("/"), ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    shutil.copy(path, src / s)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    wheels = tmp_path / "wheels"
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    for command in pip_runs:
        argv = [str(venv / "bin" / "pip"), *shlex.split(command.replace("/wheels", str(wheels)))[1:]]
        if "*" in command:  # the shell's glob, as RUN would expand it
            argv = [a for a in argv if "*" not in a] + [str(p) for p in wheels.glob("netswap-*.whl")]
        done = subprocess.run(argv, cwd=src, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
    # everything the wheel should carry
    check = [
        str(venv / "bin" / "python"),
        "-c",
        "import netswap.client.nbd, netswap.server.store, netswap.v1.swap_pb2",
    ]
    subprocess.run(check, check=True, cwd=tmp_path)

    # The image's environment, with its paths moved under tmp_path and its ports free.
    image_env: dict[str, str] = {}
    for word, args in final_stage():
        if word == "ENV":
            image_env.update(
                dict(shlex.split(pair)[0].split("=", 1) for pair in re.findall(r'\S+=(?:"[^"]*"|\S+)', args))
            )
    root = tmp_path / "root"
    ports = {"50051": str(free_port()), "9108": str(free_port()), "50052": str(free_port())}
    for key, original in list(image_env.items()):
        value = original.replace("/var/lib/netswap", str(root / "var/lib/netswap"))
        value = value.replace("/etc/netswap", str(root / "etc/netswap")).replace("0.0.0.0:", "127.0.0.1:")
        for old, new in ports.items():
            value = value.replace(f":{old}", f":{new}")
        image_env[key] = value
    tls_dir = Path(image_env["NETSWAP_TLS_CERT"]).parent
    tls_dir.mkdir(parents=True)
    ca = make_ca()
    server_cert = issue(ca, "netswap", server=True)
    Path(image_env["NETSWAP_TLS_CERT"]).write_bytes(server_cert.cert_pem)
    Path(image_env["NETSWAP_TLS_KEY"]).write_bytes(server_cert.key_pem)
    tokens = Path(image_env["NETSWAP_TOKENS"])
    tokens.parent.mkdir(parents=True)
    write_tokens(tokens)
    (root / "var/lib/netswap").mkdir(parents=True)

    run_env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", **image_env}
    (cmd,) = [exec_form(args) for word, args in final_stage() if word == "CMD"]
    (health,) = [
        exec_form(args.split("CMD", 1)[1].strip()) for word, args in final_stage() if word == "HEALTHCHECK"
    ]
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        server = subprocess.Popen(cmd, env=run_env, cwd=root, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while "serving on" not in log.read_text():
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        assert "(TLS + token)" in log.read_text()
        healthy = subprocess.run(health, env=run_env, capture_output=True, text=True, timeout=30)
        assert healthy.returncode == 0 and healthy.stdout.strip() == "SERVING", healthy
        metrics_url = "http://" + image_env["NETSWAP_METRICS_LISTEN"] + "/metrics"
        with urllib.request.urlopen(metrics_url, timeout=10) as r:
            assert b"netswap_capacity_bytes 8.589934592e+09" in r.read()
        server.terminate()
        assert server.wait(timeout=30) == 0
        unhealthy = subprocess.run(health, env=run_env, capture_output=True, text=True, timeout=30)
        assert unhealthy.returncode != 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
