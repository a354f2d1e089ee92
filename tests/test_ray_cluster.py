"""`fedpeft simulate --ray-address`: the virtual sites run on a Ray cluster that was already
running: a head and a worker node started with `ray start` on 127.0.0.1, one CPU each, stopped
by their PIDs afterwards. The run must finish, and Ray's own record of the actors must show a
virtual-site actor on each of the two nodes."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from site_files import write_heart_sites

from fedpeft.cli import main
from fedpeft.common.environment import QUIET
from fedpeft.server.store import open_store

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).parent / "ray")

#: Ray's own record of the cluster, read in a process of its own (a driver connected here would
#: stay connected for the rest of the test session). ``ray.util.state`` needs Ray's dashboard,
#: which the simulation extra does not install; the GCS's actor table is what it reads.
NODES_AND_ACTORS = """
import json, sys, ray
from ray._private import state
ray.init(address=sys.argv[1], log_to_driver=False)
nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
actors = [(a["ActorClassName"], a["Address"]["NodeID"]) for a in state.actors().values()]
print(json.dumps({"nodes": nodes, "actors": actors}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env() -> dict[str, str]:
    return {**os.environ, **QUIET}


def _cluster_state(address: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", NODES_AND_ACTORS, address],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """A Ray head and one worker node on 127.0.0.1, one CPU each; their address."""
    port = _free_port()
    address = f"127.0.0.1:{port}"
    # A short folder of its own: Ray's unix sockets live under it (paths of at most 107 bytes),
    # and nothing of another Ray on this machine is touched.
    temp = tempfile.mkdtemp(prefix="fpray-", dir="/tmp")
    common = ["--num-cpus", "1", "--node-ip-address", "127.0.0.1", "--block"]
    head = subprocess.Popen(
        [RAY, "start", "--head", "--port", str(port), "--include-dashboard=false"]
        + ["--disable-usage-stats", "--temp-dir", temp, *common],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    worker = None
    try:
        deadline = time.monotonic() + 120
        while True:  # the head's GCS port takes connections
            try:
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
                break
            except OSError:
                assert head.poll() is None, "ray start --head exited"
                assert time.monotonic() < deadline, "the Ray head did not come up"
                time.sleep(1)
        worker = subprocess.Popen(
            [RAY, "start", "--address", address, *common],
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        while len(_cluster_state(address)["nodes"]) < 2:
            assert worker.poll() is None, "ray start --address exited"
            assert time.monotonic() < deadline, "the worker node did not join"
            time.sleep(2)
        yield address
    finally:
        for proc in (worker, head):  # each stops the Ray processes it started
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
        shutil.rmtree(temp, ignore_errors=True)


def test_simulate_runs_its_sites_on_a_running_ray_cluster(
    cluster: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sites = write_heart_sites(tmp_path, ("a-cleveland", "b-hungary"), 60)
    monkeypatch.chdir(tmp_path)
    db = f"sqlite:///{tmp_path / 'runs.db'}"
    args = ["simulate", "--dataset", str(sites), "--rounds", "1", "--baselines", "none"]
    assert main([*args, "--db", db, "--ray-address", cluster]) == 0
    store = open_store(db, create=False)
    try:
        run = store.get_run()
        [result] = store.rounds(run.id)
    finally:
        store.close()
    assert run.status == "finished" and result.accepted == 2 and result.pooled_auc is not None
    state = _cluster_state(cluster)
    on = {node for name, node in state["actors"] if name == "ClientAppActor"}
    assert on == set(state["nodes"]), "a virtual site ran on each node of the cluster"


def test_an_address_nothing_answers_at_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sites = write_heart_sites(tmp_path, ("a-cleveland", "b-hungary"), 60)
    args = ["simulate", "--dataset", str(sites), "--rounds", "1", "--baselines", "none"]
    db = f"sqlite:///{tmp_path / 'runs.db'}"
    assert main([*args, "--db", db, "--ray-address", f"127.0.0.1:{_free_port()}"]) == 2
    assert "no Ray head answers there" in capsys.readouterr().err
    assert main([*args, "--db", db, "--ray-address", "ray://head:10001"]) == 2
    assert "expected HOST:PORT" in capsys.readouterr().err


def test_without_an_address_the_simulation_keeps_its_own_ray(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RAY_ADDRESS (or a `ray start` once run on this machine) would make Ray join that
    cluster, dead or alive; a plain simulation starts its own all the same."""
    sites = write_heart_sites(tmp_path, ("a-cleveland", "b-hungary"), 60)
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{_free_port()}")  # nothing listens there
    monkeypatch.chdir(tmp_path)
    args = ["simulate", "--dataset", str(sites), "--rounds", "1", "--baselines", "none"]
    assert main([*args, "--db", f"sqlite:///{tmp_path / 'runs.db'}"]) == 0
