"""A throwaway inferd for the Python benchmark scripts in this directory.

Starts `inferd` with one worker on a socket in a temp dir, from a config
written here, and gives requests over HTTP on that socket. HTTP over the
Unix socket is the Python client's own connection class
(`clients/python/src/inferd/_transport.py`), imported from the source tree,
so this needs nothing installed.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "clients", "python", "src"))
from inferd._transport import UnixHTTPConnection  # noqa: E402


def request(sock_path, method, path, body=None, timeout=600):
    """One HTTP request: (status, body bytes)."""
    conn = UnixHTTPConnection(sock_path, timeout)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        payload = json.dumps(body) if body is not None else None
        conn.request(method, path, body=payload, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def serving_pids(inferctl, sock_path):
    """Pids of the workers that serve (ready or busy), from `inferctl status`."""
    out = subprocess.run([inferctl, "--socket", sock_path, "status", "--json"],
                         check=True, capture_output=True, text=True).stdout
    return [w["pid"] for w in json.loads(out)["workers"] if w["state"] in ("ready", "busy")]


def wait_serving(inferctl, sock_path, other_than=None, limit_s=120):
    """Waits (bounded) for a serving worker, other than pid `other_than`."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            pids = [p for p in serving_pids(inferctl, sock_path) if p != other_than]
            if pids:
                return pids[0]
        except subprocess.CalledProcessError:
            pass
        time.sleep(0.02)
    sys.exit("inferd: no worker became ready in time")


@contextlib.contextmanager
def daemon(inferd, model_path, settings=()):
    """Runs inferd with one worker serving `model_path`; `settings` are extra
    `KEY=VALUE` config lines. Yields (socket path, inferctl path); SIGTERM and
    wait on exit."""
    inferctl = os.path.join(os.path.dirname(inferd), "inferctl")
    with tempfile.TemporaryDirectory(prefix="inferd-bench-") as tmp:
        sock_path = os.path.join(tmp, "inferd.sock")
        config = os.path.join(tmp, "inferd.toml")
        with open(config, "w") as f:
            f.write(f'socket = "{sock_path}"\nworkers = 1\nmodel = "{model_path}"\n')
            f.write("request_timeout_ms = 600000\ndefault_deadline_ms = 600000\n")
            for line in settings:
                key, value = line.split("=", 1)
                f.write(f"{key} = {value}\n")
        process = subprocess.Popen([inferd, "--config", config],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   env={**os.environ, "RUST_LOG": "warn"})
        try:
            yield sock_path, inferctl
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
