"""Ray housekeeping: odis's own local Ray does not outlive a command killed with SIGKILL, and a cluster with token
authentication that refuses the connection is said to, with how to pass the token."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from odis.pipelines.ray_connect import RayAddressError, probe_ray_address
from odis.pipelines.ray_watchdog import stop_processes

pytestmark = pytest.mark.slow  # real Ray instances (about 40 s in all on 2 CPU cores)

ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}


def _alive(procs: list[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(f"{p.pid} {p.name()}")
        except psutil.NoSuchProcess:
            pass
    return out


def test_sigkilled_extract_boxes_leaves_no_ray_process(coco_tiny, tmp_path):
    """Before the watchdog, Ray's DashboardAgent and RuntimeEnvAgent lived on (parent 1) after the driver's
    SIGKILL; now every process the command started is gone within seconds."""
    cmd = [sys.executable, "-m", "odis", "extract-boxes", "--detector", "selective-search", "--images",
           str(coco_tiny / "val2017"), "--out", str(tmp_path / "m.parquet"), "--use-ray"]
    driver = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        root, procs, deadline = psutil.Process(driver.pid), {}, time.monotonic() + 120
        while time.monotonic() < deadline:  # until the job runs: raylet, both agents and the watchdog up
            for c in root.children(recursive=True):
                procs.setdefault(c.pid, c)
            names = {p.name() for p in procs.values() if p.is_running()}
            if {"raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent"} <= names and any(
                    "ray_watchdog" in " ".join(p.cmdline()) for p in procs.values() if p.is_running()):
                break
            assert driver.poll() is None, "extract-boxes ended before its Ray was up"
            time.sleep(0.5)
        else:
            pytest.fail(f"Ray did not come up: {sorted(names)}")
        time.sleep(1.5)  # the watchdog's first look at the tree
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        deadline = time.monotonic() + 20
        while _alive(list(procs.values())) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _alive(list(procs.values())), f"left behind: {_alive(list(procs.values()))}"
    finally:
        if driver.poll() is None:
            driver.kill()
        stop_processes({p.pid: p.create_time() for p in procs.values() if p.is_running()}, grace=1)


def test_stop_processes_signals_only_the_same_process():
    """A pid is named with its start time: a recycled pid (another start time) is never signalled."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        proc = psutil.Process(p.pid)
        created = proc.create_time()
        assert stop_processes({p.pid: created - 5.0}, grace=0.1) == [] and _alive([proc])
        assert stop_processes({p.pid: created}, grace=2) == [p.pid]
        assert not _alive([proc])  # (psutil reaped it: its exit status is psutil's, not Popen's)
    finally:
        p.kill()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def token_head(tmp_path_factory):
    """A real Ray head with token authentication (`ray start --head --block`), on a free port."""
    port, token = _free_port(), "odis-test-token-0123456789abcdef"
    tmp = tmp_path_factory.mktemp("raytok")
    env = {**ENV, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    head = subprocess.Popen([sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
                             "--port", str(port), "--num-cpus", "1", "--include-dashboard", "false",
                             "--temp-dir", str(tmp)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert head.poll() is None, "ray start --head failed"
            time.sleep(0.5)
    try:
        yield f"127.0.0.1:{port}", token
    finally:
        tree = psutil.Process(head.pid).children(recursive=True) + [psutil.Process(head.pid)]
        os.killpg(head.pid, signal.SIGTERM)
        stop_processes({p.pid: p.create_time() for p in tree if p.is_running()}, grace=5)


def _no_token_here(monkeypatch, tmp_path):
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "no-token-file"))


def test_token_cluster_refusal_says_how_to_pass_the_token(token_head, monkeypatch, tmp_path):
    """ray.init retried for 18 s printing gRPC warnings, then 'Failed to connect'; now the check says why.
    (probe_ray_address: check_ray_address checks nothing in a process with Ray up, as the suite's may be.)"""
    address, token = token_head
    _no_token_here(monkeypatch, tmp_path)
    with pytest.raises(RayAddressError) as e:
        probe_ray_address(address)
    msg = str(e.value)
    assert "token authentication" in msg and "no token is set here" in msg and "RAY_AUTH_TOKEN=<token>" in msg
    assert "ray get-auth-token" in msg
    monkeypatch.setenv("RAY_AUTH_TOKEN", "wrong")
    with pytest.raises(RayAddressError, match="RAY_AUTH_TOKEN is not the cluster's"):
        probe_ray_address(address)
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    (tmp_path / "token").write_text(token + "\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "token"))
    probe_ray_address(address)  # the cluster's token, from the file Ray would read: accepted
    monkeypatch.setenv("RAY_AUTH_TOKEN", token)
    probe_ray_address(address)


def test_token_refusal_from_the_cli(token_head, coco_tiny, tmp_path):
    address, _ = token_head
    env = {k: v for k, v in ENV.items() if not k.startswith("RAY_AUTH")}
    env["RAY_AUTH_TOKEN_PATH"] = str(tmp_path / "no-token-file")
    for cmd in (["extract-boxes", "--detector", "selective-search", "--images", str(coco_tiny / "val2017"),
                 "--out", str(tmp_path / "m.parquet")],
                ["shard", "--images", str(coco_tiny / "val2017"), "--out", str(tmp_path / "shards")]):
        r = subprocess.run([sys.executable, "-m", "odis", *cmd, "--ray-address", address], env=env,
                           capture_output=True, text=True, timeout=60, check=False)
        assert r.returncode == 2, (cmd[0], r.stdout, r.stderr)
        assert "uses token authentication and no token is set here" in r.stdout + r.stderr, (cmd[0], r.stderr)
        assert not (tmp_path / "m.parquet").exists()
