"""A real deployment on 127.0.0.1: a Flower SuperLink with TLS, SuperNode authentication and its
state in a SQLite file, two SuperNodes (one hospital each, each with fedpeft's site worker), one
round of fedpeft. Then every file the coordinator wrote is searched for the bytes of the sites'
plaintext deltas; and a run whose ClientApp is the coordinator's own code is refused by every
site, on the same SuperLink and SuperNodes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedpeft.client.policy import default_methods
from fedpeft.common.data import heart_sites
from fedpeft.common.environment import FLWR_HOME_ENV
from fedpeft.common.state import state_from_bytes
from fedpeft.processes import BIN, child_env
from fedpeft.server.checkpoints import open_state, read_store_key, write_store_key
from fedpeft.server.store import RunInfo, RunOwner, SiteResult, open_store, pid_alive
from fedpeft.server.store.base import utcnow

pytestmark = pytest.mark.slow
APP = Path(__file__).parent / "deploy_app"
EVIL_APP = Path(__file__).parent / "evil_app"
SITES = ("Cleveland", "Hungary")
#: deploy_app's ClientApp is fedpeft's plus a site-local copy of each delta: the sites of these
#: tests have it installed (on their PYTHONPATH) and allow it beside fedpeft's own.
SITE_APPS = tuple(
    arg
    for app in (
        "fedpeft.client.app:app",
        "site_dump:app",
        "site_forge:app",
        "site_forge:withholding",
    )
    for arg in ("--allow-app", app)
)
#: The site that runs site_forge's hostile code when a run names it, and the site it poses as.
FORGER, VICTIM = "Hungary", "Cleveland"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"process {proc.args!r} exited with {proc.returncode}"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {seconds} s")


def _stop(started: list[subprocess.Popen[bytes]]) -> None:
    for proc in reversed(started):
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in started:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)
        with contextlib.suppress(ProcessLookupError):  # children that outlived their parent
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes the test starts, each in its own process group (with the Flower processes and
    the site worker it starts in turn); every group is stopped at the end, whatever happens."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    _stop(started)


def _env(home: Path) -> dict[str, str]:
    # PYTHONPATH: what the test sites have installed beside fedpeft (deploy_app's ClientApp).
    return child_env(
        {
            FLWR_HOME_ENV: str(home),
            "PYTHONPATH": str(APP),
            "FEDPEFT_TEST_FORGER": FORGER,
            "FEDPEFT_TEST_VICTIM": VICTIM,
        }
    )


def _windows(state: dict[str, np.ndarray]) -> list[bytes]:
    """Byte strings that only the plaintext delta holds: 16 values from the middle of every
    tensor that moved, as fp32 and as fp16."""
    out = []
    for value in state.values():
        flat = value.reshape(-1)
        if flat.size < 16 or not np.count_nonzero(flat):
            continue
        mid = flat[flat.size // 2 - 8 : flat.size // 2 + 8]
        if np.count_nonzero(mid) < 8:
            continue
        out += [mid.astype("<f4").tobytes(), mid.astype("<f2").tobytes()]
    return out


def _fedpeft(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "fedpeft"), *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def _start(
    processes: list[subprocess.Popen[bytes]], cwd: Path, log: str, *args: str
) -> subprocess.Popen[bytes]:
    with (cwd / log).open("wb") as out:
        proc = subprocess.Popen(
            [str(BIN / "fedpeft"), *args],
            cwd=cwd,
            env=_env(cwd / "flwr-home"),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    processes.append(proc)
    return proc


#: Hungary's policy leaves out ia3 (every other method of the default policy stays allowed).
POLICY_METHODS = {"Hungary": tuple(m for m in default_methods() if m != "ia3")}


def _site_toml(home: Path, site: str, fleet: int, coord: Path) -> Path:
    methods = POLICY_METHODS.get(site)
    (home / "site.toml").write_text(
        f'[site]\nname = "{site}"\ncoordinator = "127.0.0.1:{fleet}"\n'
        f'ca = "{coord / "certs" / "ca.crt"}"\nidentity_key = "keys/{site}.key"\n'
        f'coordinator_key = "{coord / "keys" / "coordinator.pub"}"\n'
        f'data = "records.csv"\napi_port = {_free_port()}\ndevice = "cpu"\n'
        + ("" if methods is None else f"\n[policy]\nmethods = {list(methods)!r}\n")
    )
    return home / "site.toml"


def _coordinator(tmp_path: Path, processes: list[subprocess.Popen[bytes]]) -> tuple[Path, int]:
    """A running coordinator (TLS, site authentication) in tmp_path/coordinator; its Fleet port."""
    coord = tmp_path / "coordinator"
    coord.mkdir()
    for args in (("certs", "--name", "localhost", "--name", "127.0.0.1"), ("coordinator", "init")):
        assert _fedpeft(*args, cwd=coord).returncode == 0
    write_store_key(coord / "store.key")
    (coord / "sites.txt").write_text("# registered sites\n")
    fleet, api = _free_port(), _free_port()
    (coord / "coordinator.toml").write_text(
        f'[coordinator]\nfleet_address = "127.0.0.1:{fleet}"\napi_address = "127.0.0.1:{api}"\n'
        'state = "superlink.db"\n\n[tls]\nca = "certs/ca.crt"\n'
        'certificate = "certs/server.pem"\nkey = "certs/server.key"\n'
    )
    superlink = _start(
        processes, coord, "coordinator.log", "coordinator", "start", "--config", "coordinator.toml"
    )
    _wait_for_port(api, superlink)
    _wait_for_port(fleet, superlink)

    return coord, fleet


def _site(
    tmp_path: Path,
    processes: list[subprocess.Popen[bytes]],
    site: str,
    coord: Path,
    fleet: int,
    rows: tuple[list[str], np.ndarray],
) -> subprocess.Popen[bytes]:
    """Enroll, register and start a site with these records."""
    home = tmp_path / site
    home.mkdir()
    assert _fedpeft("site", "enroll", "--name", site, cwd=home).returncode == 0
    added = _fedpeft(
        *("coordinator", "add-site", site, str(home / "keys" / f"{site}.pub")),
        *("--config", "coordinator.toml"),
        cwd=coord,
    )
    assert added.returncode == 0 and "allow-listed" in added.stdout, added.stderr
    pd.DataFrame({"text": rows[0], "label": rows[1]}).to_csv(home / "records.csv", index=False)
    (home / "dump").mkdir()
    _site_toml(home, site, fleet, coord)
    return _start(processes, home, "site.log", "site", "start", "--config", "site.toml", *SITE_APPS)


def _sample(data: object, n: int = 60) -> tuple[list[str], np.ndarray]:
    idx = np.random.default_rng(0).choice(len(data), n, replace=False)  # type: ignore[arg-type]
    return [data.texts[i] for i in idx], data.labels[idx]  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Deployment:
    root: Path
    coord: Path
    fleet: int


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """One coordinator and the two SITES, shared by the tests of this module that do not kill
    anything (starting them is most of a test's time)."""
    root = tmp_path_factory.mktemp("deployment")
    started: list[subprocess.Popen[bytes]] = []
    try:
        coord, fleet = _coordinator(root, started)
        for site, data in zip(SITES, heart_sites()[:2], strict=True):
            _site(root, started, site, coord, fleet, _sample(data))
        yield Deployment(root, coord, fleet)
    finally:
        _stop(started)


def test_one_round_over_tls_leaves_no_plaintext_delta_at_the_coordinator(
    deployment: Deployment, processes: list[subprocess.Popen[bytes]]
) -> None:
    tmp_path, coord, fleet = deployment.root, deployment.coord, deployment.fleet
    dumps = [tmp_path / site / "dump" for site in SITES]

    # A site whose key is not registered is refused by the SuperLink: its SuperNode exits.
    stranger = tmp_path / "Stranger"
    stranger.mkdir()
    assert _fedpeft("site", "enroll", "--name", "Stranger", cwd=stranger).returncode == 0
    (stranger / "records.csv").write_bytes((tmp_path / SITES[0] / "records.csv").read_bytes())
    _site_toml(stranger, "Stranger", fleet, coord)
    refused = _start(processes, stranger, "site.log", "site", "start", "--config", "site.toml")
    assert refused.wait(timeout=120) != 0

    # The coordinator's store (coordinator.toml's default, runs.db beside it): a run config names
    # none.
    db = f"sqlite:///{coord / 'runs.db'}"
    run_config = f'data.dataset="{tmp_path}" federation.min_sites=2'
    run = subprocess.run(
        [str(BIN / "flwr"), "run", str(APP), "coordinator", "--stream", "--run-config", run_config],
        env=_env(coord / "flwr-cli"),
        cwd=coord,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    # Flower's own exit code can be 0 for a crashed ServerApp: the store says what happened.
    store = open_store(db)
    (info,) = store.list_runs()
    assert info.status == "finished", info.error
    (rnd,) = store.rounds(info.id)
    assert rnd.accepted == 2 and rnd.rejected == 0 and rnd.applied
    evals = [r for r in store.site_results(info.id) if r.phase == "evaluate"]
    assert sorted(r.site for r in evals) == sorted(SITES)
    assert all(r.status == "ok" and r.auc is not None for r in evals)
    store.close()

    # `fedpeft run start` on the same coordinator: it follows the run and reports it from the
    # store; a run that cannot get its minimum of sites fails, and so does the command.
    (coord / "run.toml").write_text(
        'device = "cpu"\ndb = "sqlite:///runs.db"\n[federation]\nrounds = 1\nmin_sites = 2\n'
        "[model]\nmax_length = 64\n"
    )
    follow = _fedpeft("run", "start", "run.toml", "--coordinator", "coordinator.toml", cwd=coord)
    assert follow.returncode == 0, follow.stdout[-3000:] + follow.stderr[-3000:]
    assert "macro (mean of sites)" in follow.stdout
    (coord / "bad.toml").write_text(
        'db = "sqlite:///runs.db"\n[federation]\nmin_sites = 3\nround_timeout_s = 5.0\n'
    )
    bad = _fedpeft("run", "start", "bad.toml", "--coordinator", "coordinator.toml", cwd=coord)
    assert bad.returncode == 2 and "failed: TimeoutError" in bad.stderr, bad.stderr[-2000:]
    store = open_store(db)
    assert [r.status for r in store.list_runs()] == ["finished", "finished", "failed"]
    store.close()

    deltas = [state_from_bytes(p.read_bytes()) for d in dumps for p in d.glob("delta-*")]
    assert len(deltas) == 2
    needles = [w for delta in deltas for w in _windows(delta)]
    assert len(needles) >= 8
    # The search can fail: the sites' own copies hold the bytes.
    site_copies = b"".join(p.read_bytes() for d in dumps for p in d.iterdir())
    assert all(n in site_copies for n in needles[::2])  # fp32 windows, as stored there
    written = [p for p in coord.rglob("*") if p.is_file()]
    assert any(p.name.startswith("superlink.db") for p in written)  # SuperLink state
    for path in written:
        data = path.read_bytes()
        for needle in needles:
            assert needle not in data, f"plaintext delta bytes found in {path}"


def _submit(
    deployment: Deployment, app: Path, run_config: str, status: str = "failed"
) -> tuple[RunInfo, list[SiteResult]]:
    """Submit ``app`` to the shared coordinator with ``run_config``; the run it made (expected
    to end with ``status``: by default it fails, no site trains) and its site rows, from the
    coordinator's store."""
    coord = deployment.coord
    db = f"sqlite:///{coord / 'runs.db'}"  # the coordinator's store, shared with other tests
    store = open_store(db)
    before = {r.id for r in store.list_runs()}
    store.close()
    run = subprocess.run(
        [str(BIN / "flwr"), "run", str(app), "coordinator", "--stream"]
        + ["--run-config", run_config],
        env=_env(coord / "flwr-cli"),
        cwd=coord,
        capture_output=True,
        text=True,
        timeout=600,
    )
    store = open_store(db)
    (info,) = [r for r in store.list_runs() if r.id not in before]
    assert info.status == status, run.stdout[-3000:] + run.stderr[-3000:]
    rows = store.site_results(info.id)
    store.close()
    return info, rows


def test_every_site_refuses_an_app_it_did_not_install_and_none_of_its_code_runs(
    deployment: Deployment,
) -> None:
    """The coordinator submits a run whose ClientApp is its own module (it would leave a marker
    file on import and when called): each site's worker refuses it by name, the store records
    that per site, and no marker exists anywhere."""
    run_config = f'data.dataset="{deployment.root}" federation.min_sites=2'
    _, rows = _submit(deployment, EVIL_APP, run_config)
    assert {(r.site, r.phase) for r in rows} == {
        (s, p) for s in SITES for p in ("train", "evaluate")
    }
    for r in rows:
        assert r.status == "failed", r
        assert r.reason == "refused: app 'evil_client:app' is not allowed at this site"
    markers = [p for p in deployment.root.rglob("EVIL-MARKER*")]
    assert not markers, f"coordinator code ran at a site: {markers}"
    for site in SITES:  # and each site says so in its own log
        assert "refused" in (deployment.root / site / "site.log").read_text()


def test_a_site_whose_policy_forbids_the_method_refuses_and_the_other_trains(
    deployment: Deployment,
) -> None:
    """An ia3 run: Hungary's policy leaves ia3 out, so Hungary refuses each task before reading
    a row, the store records the policy's reason for it, and Cleveland trains alone (min_sites
    1): the run finishes. Each site's ledger (the default, ledger.jsonl beside site.toml)
    verifies; Hungary's holds the refusals, Cleveland's the ia3 upload."""
    run_config = f'data.dataset="{deployment.root}" federation.min_sites=1 method.name="ia3"'
    info, rows = _submit(deployment, APP, run_config, status="finished")
    allowed = ", ".join(POLICY_METHODS["Hungary"])
    reason = f"refused: policy: method 'ia3' is not allowed at this site (allowed: {allowed})"
    assert sorted((r.site, r.phase, r.status, r.reason) for r in rows) == [
        ("Cleveland", "evaluate", "ok", None),
        ("Cleveland", "train", "ok", None),
        ("Hungary", "evaluate", "failed", reason),
        ("Hungary", "train", "failed", reason),
    ]
    store = open_store(f"sqlite:///{deployment.coord / 'runs.db'}")
    (rnd,) = store.rounds(info.id)
    store.close()
    assert rnd.applied and (rnd.accepted, rnd.rejected) == (1, 1)
    for site, expected in (("Hungary", "not allowed at this site"), ("Cleveland", "upload")):
        home = deployment.root / site
        checked = _fedpeft("site", "ledger", "--config", "site.toml", "--verify", cwd=home)
        assert checked.returncode == 0, checked.stdout
        table = _fedpeft("site", "ledger", "--config", "site.toml", cwd=home).stdout
        assert expected in table and "ia3" in table, table


def _app_running(tmp: Path, clientapp: str) -> Path:
    """deploy_app with ``clientapp`` as its ClientApp, in a new folder under ``tmp``."""
    text = (APP / "pyproject.toml").read_text()
    assert 'clientapp = "site_dump:app"' in text
    folder = tmp / clientapp.replace(":", "-")
    folder.mkdir()
    (folder / "pyproject.toml").write_text(
        text.replace('clientapp = "site_dump:app"', f'clientapp = "{clientapp}"')
    )
    return folder


def _global_states(coord: Path, run_id: int, rounds: int) -> list[dict[str, np.ndarray]]:
    store = open_store(f"sqlite:///{coord / 'runs.db'}")
    try:
        blobs = [store.global_state(run_id, rnd) for rnd in range(1, rounds + 1)]
    finally:
        store.close()
    key = read_store_key(coord / "store.key")
    return [open_state(key, run_id, rnd, blob) for rnd, blob in blobs]


def test_a_site_forging_a_different_reply_each_round_changes_nothing(
    deployment: Deployment, tmp_path: Path
) -> None:
    """Issue 12's fault (c): Hungary runs site_forge (tests/deploy_app): each of four rounds it
    sends another forged or malformed update (another site's name, NaN values, an altered
    ciphertext, a replay of the previous round's) and another bad evaluation (10^300 validation
    rows, a short histogram, NaN test rows, another site's name). Each is rejected with its
    reason, the run finishes, and every round's global state equals, bit for bit, that of the
    same run in which Hungary sent no update at all."""
    run_config = f'data.dataset="{deployment.root}" federation.rounds=4 federation.min_sites=1'
    forged, rows = _submit(
        deployment, _app_running(tmp_path, "site_forge:app"), run_config, status="finished"
    )
    reference, _ = _submit(
        deployment, _app_running(tmp_path, "site_forge:withholding"), run_config, "finished"
    )
    found = {
        (r.phase, r.round): (r.status, (r.reason or "").split(":")[0])
        for r in rows
        if r.site == FORGER
    }
    assert found == {
        ("train", 1): ("rejected", "bad-signature"),
        ("train", 2): ("rejected", "non-finite"),
        ("train", 3): ("rejected", "tampered"),
        ("train", 4): ("rejected", "wrong-round"),
        ("evaluate", 1): ("rejected", "evaluation"),
        ("evaluate", 2): ("rejected", "evaluation"),
        ("evaluate", 3): ("rejected", "evaluation"),
        ("evaluate", 4): ("rejected", "bad-signature"),
    }, rows
    assert all(r.status == "ok" for r in rows if r.site == VICTIM)
    store = open_store(f"sqlite:///{deployment.coord / 'runs.db'}")
    rounds = store.rounds(forged.id)
    store.close()
    assert [(r.round, r.accepted, r.rejected, r.applied) for r in rounds] == [
        (rnd, 1, 1, True) for rnd in (1, 2, 3, 4)
    ]
    states = _global_states(deployment.coord, forged.id, 4)
    expected = _global_states(deployment.coord, reference.id, 4)
    for rnd, (state, same) in enumerate(zip(states, expected, strict=True), start=1):
        assert state.keys() == same.keys()
        for name in state:
            assert np.array_equal(state[name], same[name]), (rnd, name)
    assert any(  # and the rounds did change the state
        not np.array_equal(states[0][name], states[-1][name]) for name in states[0]
    )


def _ledger_lines(home: Path) -> list[dict[str, object]]:
    """The entries of the site ledger in ``home`` (ledger.jsonl beside site.toml)."""
    ledger = home / "ledger.jsonl"
    lines = ledger.read_text().splitlines() if ledger.exists() else []
    return [json.loads(line) for line in lines]


def _wait_for_uploads(
    homes: list[Path], since: list[int], rnd: int, proc: subprocess.Popen[bytes]
) -> None:
    """Until each site in ``homes`` has sent its train reply of round ``rnd`` (its ledger's
    upload entry, written as the reply leaves), among the entries after ``since``."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if all(
            any(
                e["event"] == "upload" and e["round"] == rnd and e["message_type"] == "train"
                for e in _ledger_lines(home)[skip:]
            )
            for home, skip in zip(homes, since, strict=True)
        ):
            return
        assert proc.poll() is None, f"{proc.args!r} exited with {proc.returncode}"
        time.sleep(0.1)
    raise TimeoutError(f"the sites did not send round {rnd}'s updates in 600 s")


def test_a_store_locked_for_7_s_during_a_round_write_loses_nothing(
    deployment: Deployment, processes: list[subprocess.Popen[bytes]]
) -> None:
    """Issue 12's fault (d): as the sites send round 2's updates (whose replies also carry
    their evaluation of round 1's state, after which round 1 is written), another connection
    takes the store's write lock (BEGIN EXCLUSIVE) and holds it 7 s. Round 1's write came while
    the lock was held (its finish time, taken just before the write, lies inside the 7 s, and
    the row was not there when the lock was let go); it waited, and the run finishes with every
    round and every site's rows."""
    coord, homes = deployment.coord, [deployment.root / site for site in SITES]
    since = [len(_ledger_lines(home)) for home in homes]
    run_config = f'data.dataset="{deployment.root}" federation.rounds=3 federation.min_sites=2'
    with (coord / "locked-run.log").open("wb") as log:
        run = subprocess.Popen(
            [str(BIN / "flwr"), "run", str(APP), "coordinator", "--stream"]
            + ["--run-config", run_config],
            env=_env(coord / "flwr-cli"),
            cwd=coord,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    processes.append(run)
    _wait_for_uploads(homes, since, 2, run)
    lock = sqlite3.connect(coord / "runs.db", isolation_level=None, timeout=60)
    try:
        lock.execute("BEGIN EXCLUSIVE")
        locked_at = utcnow()
        (run_id,) = lock.execute("SELECT max(id) FROM runs").fetchone()
        time.sleep(7)
        (written,) = lock.execute(
            "SELECT count(*) FROM rounds WHERE run_id = ?", (run_id,)
        ).fetchone()
        released_at = utcnow()
        lock.execute("ROLLBACK")
    finally:
        lock.close()
    assert written == 0  # round 1 waited for the lock
    assert run.wait(timeout=600) == 0, (coord / "locked-run.log").read_text()[-3000:]
    store = open_store(f"sqlite:///{coord / 'runs.db'}")
    try:
        info = store.get_run(run_id)
        rounds = store.rounds(run_id)
        rows = store.site_results(run_id)
    finally:
        store.close()
    assert info.status == "finished", info.error
    assert [(r.round, r.accepted, r.applied) for r in rounds] == [(n, 2, True) for n in (1, 2, 3)]
    assert locked_at <= rounds[0].finished_at <= released_at, (locked_at, released_at)
    assert sorted((r.round, r.phase, r.site) for r in rows if r.status == "ok") == sorted(
        (n, phase, site) for n in (1, 2, 3) for phase in ("train", "evaluate") for site in SITES
    )


#: The run the "killed mid-run" tests start: three rounds, at least two sites, a short timeout.
THREE_ROUNDS = (
    'device = "cpu"\n[federation]\nrounds = 3\nmin_sites = 2\nround_timeout_s = 150.0\n'
    "[model]\nmax_length = 64\n"
)


def _follow_run(
    coord: Path, processes: list[subprocess.Popen[bytes]], run_toml: str = THREE_ROUNDS
) -> subprocess.Popen[bytes]:
    """``fedpeft run start`` of ``run_toml`` on the coordinator in ``coord``, in the background
    (its own process group, stopped with the test's), its output in coord/run.log."""
    (coord / "run.toml").write_text(run_toml)
    with (coord / "run.log").open("wb") as log:
        follow = subprocess.Popen(
            [str(BIN / "fedpeft"), "run", "start", "run.toml", "--coordinator", "coordinator.toml"],
            cwd=coord,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    processes.append(follow)
    return follow


def _owner_once_round_1_is_stored(coord: Path, follow: subprocess.Popen[bytes]) -> RunOwner:
    """The owner (the ServerApp) of the coordinator's only run, once its round 1 is stored."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if (coord / "runs.db").exists():
            store = open_store(f"sqlite:///{coord / 'runs.db'}")
            try:
                runs = store.list_runs()
                owner = runs[0].owner if runs and store.rounds(runs[0].id) else None
            finally:
                store.close()
            if owner is not None:
                assert owner.pid != follow.pid  # the ServerApp, not the CLI
                return owner
        assert follow.poll() is None, (coord / "run.log").read_text()[-3000:]
        time.sleep(0.5)
    raise TimeoutError("round 1 was not recorded in 600 s")


def _resume(coord: Path, run_id: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "fedpeft"), "run", "resume", str(run_id), "--coordinator", "coordinator.toml"],
        cwd=coord,
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_a_site_killed_during_its_upload_does_not_stop_the_run(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    """Issue 12's fault (e): three hospitals, three rounds, at least two sites per round. The
    third site's SuperNode and worker are SIGKILLed as its round 2 update leaves (its ledger's
    upload entry, written as the reply is handed to the SuperNode). That update arrives whole
    and is used, or is missing: never half-read or rejected. Rounds 2 and 3 complete with the
    two others, and the store records the dead site's failure."""
    coord, fleet = _coordinator(tmp_path, processes)
    names = ("Cleveland", "Hungary", "Switzerland")
    sites = {
        name: _site(tmp_path, processes, name, coord, fleet, _sample(data))
        for name, data in zip(names, heart_sites()[:3], strict=True)
    }
    follow = _follow_run(coord, processes)
    _wait_for_uploads([tmp_path / "Switzerland"], [0], 2, follow)
    os.killpg(sites["Switzerland"].pid, signal.SIGKILL)
    assert follow.wait(timeout=900) == 0, (coord / "run.log").read_text()[-3000:]

    store = open_store(f"sqlite:///{coord / 'runs.db'}")
    (run,) = store.list_runs()
    assert run.status == "finished"
    rounds = store.rounds(run.id)
    dead = [r for r in store.site_results(run.id) if r.site == "Switzerland" and r.phase == "train"]
    store.close()
    assert [r.round for r in rounds] == [1, 2, 3] and all(r.applied for r in rounds)
    assert rounds[0].accepted == 3 and rounds[2].accepted == 2
    by_round = {r.round: r for r in dead}
    assert by_round[1].status == "ok"
    if rounds[1].accepted == 3:  # its update had left whole
        assert by_round[2].status == "ok"
    else:
        assert rounds[1].accepted == 2 and by_round[2].status == "failed"
    # Round 3 is sent to the sites online then: once Flower has dropped the dead node, none.
    assert 3 not in by_round or by_round[3].status == "failed"
    for r in dead[1:]:
        if r.status == "failed":
            assert r.reason is not None and r.reason.split(":")[0] in ("no-reply", "site-error")


def test_a_serverapp_killed_after_round_1_is_resumed_and_the_run_finishes(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    """Issue 12's fault (a): two hospitals, three rounds. Once round 1 is in the store, the
    ServerApp running the rounds (the run's owner, as the store records it) is SIGKILLed.
    `fedpeft run start` notices, marks the run interrupted and exits non-zero; `fedpeft run
    resume` submits it again and it finishes with every round, the resumption recorded; the
    sites were not touched."""
    coord, fleet = _coordinator(tmp_path, processes)
    names = ("Cleveland", "Hungary")
    for name, data in zip(names, heart_sites()[:2], strict=True):
        _site(tmp_path, processes, name, coord, fleet, _sample(data))
    follow = _follow_run(coord, processes)
    db = f"sqlite:///{coord / 'runs.db'}"
    owner = _owner_once_round_1_is_stored(coord, follow)
    os.kill(owner.pid, signal.SIGKILL)
    # run start sees its ServerApp gone, marks the run interrupted and says how to resume it.
    assert follow.wait(timeout=600) != 0
    said = (coord / "run.log").read_text()
    assert "marked interrupted" in said and "fedpeft run resume 1" in said, said[-3000:]
    store = open_store(db)
    (run,) = store.list_runs()
    assert run.status == "interrupted"
    recorded = [r.round for r in store.rounds(run.id)]
    store.close()

    resumed = _resume(coord, run.id)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resuming run 1 (interrupted) after round {recorded[-1]} of 3" in resumed.stdout
    store = open_store(db)
    try:
        (run,) = store.list_runs()
        assert run.status == "finished"
        rounds = store.rounds(run.id)
        assert [r.round for r in rounds] == [1, 2, 3] and all(r.applied for r in rounds)
        (resumption,) = store.resumptions(run.id)
        assert resumption.after_round == recorded[-1]
        assert resumption.reason.startswith("resumed from interrupted")
        assert resumption.owner is not None and resumption.owner.pid != owner.pid
    finally:
        store.close()


def test_a_coordinator_restarted_between_rounds_takes_the_run_up_again(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    """Issue 12's fault (b): two hospitals, three rounds. Once round 1 is stored, the coordinator
    service (`fedpeft coordinator start` and its SuperLink, whose state is in SQLite) gets
    SIGTERM, and is started again. Once its SuperLink has exited, the coordinator stops the
    ServerApp Flower started in another session (it would wait for ever) and marks the run
    interrupted. The SuperNodes, left running, reconnect by themselves; `fedpeft run resume`
    finishes the run with both sites in every round."""
    coord, fleet = _coordinator(tmp_path, processes)
    superlink = processes[0]
    for name, data in zip(SITES, heart_sites()[:2], strict=True):
        _site(tmp_path, processes, name, coord, fleet, _sample(data))
    follow = _follow_run(coord, processes)
    owner = _owner_once_round_1_is_stored(coord, follow)
    os.killpg(superlink.pid, signal.SIGTERM)
    superlink.wait(timeout=180)
    # Flower starts the ServerApp in a session of its own: it stopped on its own when its
    # parent went (and marked its run interrupted), or the coordinator stopped it.
    assert not pid_alive(owner.host, owner.pid)
    assert follow.wait(timeout=600) != 0  # run start said the run stopped, and how to resume it
    assert "fedpeft run resume 1" in (coord / "run.log").read_text()

    restarted = _start(
        processes,
        coord,
        "coordinator-2.log",
        "coordinator",
        "start",
        "--config",
        "coordinator.toml",
    )
    _wait_for_port(fleet, restarted)
    store = open_store(f"sqlite:///{coord / 'runs.db'}")
    (run,) = store.list_runs()
    stored = [r.round for r in store.rounds(run.id)]
    store.close()
    assert run.status == "interrupted" and stored, run
    resumed = _resume(coord, run.id)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    store = open_store(f"sqlite:///{coord / 'runs.db'}")
    try:
        run = store.get_run(run.id)
        rounds = store.rounds(run.id)
        (resumption,) = store.resumptions(run.id)
    finally:
        store.close()
    assert run.status == "finished"
    assert [(r.round, r.accepted, r.applied) for r in rounds] == [(n, 2, True) for n in (1, 2, 3)]
    assert resumption.after_round == stored[-1]


def test_a_secure_aggregation_run_survives_a_site_killed_after_masking(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    """Issue 13: three hospitals, two rounds with secure aggregation (four exchanges a round:
    keys, shares, masked updates, unmasking, through the site worker). Switzerland's SuperNode
    and worker are SIGKILLed as its masked round 1 update leaves: the two others' shares (t = 2
    of 3) unmask the round's sum with or without it, and round 2 runs with the two. No update
    the coordinator opened was a site's own, nor any score histogram."""
    coord, fleet = _coordinator(tmp_path, processes)
    names = ("Cleveland", "Hungary", "Switzerland")
    sites = {
        name: _site(tmp_path, processes, name, coord, fleet, _sample(data))
        for name, data in zip(names, heart_sites()[:3], strict=True)
    }
    run_toml = (
        'device = "cpu"\n[federation]\nrounds = 2\nmin_sites = 2\nround_timeout_s = 150.0\n'
        "[federation.secure_aggregation]\nenabled = true\n[model]\nmax_length = 64\n"
    )
    follow = _follow_run(coord, processes, run_toml)
    _wait_for_uploads([tmp_path / "Switzerland"], [0], 1, follow)
    os.killpg(sites["Switzerland"].pid, signal.SIGKILL)
    assert follow.wait(timeout=900) == 0, (coord / "run.log").read_text()[-3000:]

    store = open_store(f"sqlite:///{coord / 'runs.db'}")
    (run,) = store.list_runs()
    rounds = store.rounds(run.id)
    rows = store.site_results(run.id)
    store.close()
    assert run.status == "finished"
    assert [r.round for r in rounds] == [1, 2] and all(r.applied for r in rounds)
    assert rounds[0].accepted in (2, 3) and rounds[1].accepted == 2
    used = [r for r in rows if r.phase == "train" and r.status == "ok"]
    assert all(r.extra["weight"] == 1 / (2 if r.round == 2 else rounds[0].accepted) for r in used)
    # Each round's pooled AUC from the score histograms summed under masks (round 2's in the
    # closing evaluation's own secure exchange); every evaluation row holds metrics.
    assert all(r.pooled_auc is not None for r in rounds)
    assert {(r.round, r.site) for r in rows if r.phase == "evaluate" and r.status == "ok"} >= {
        (n, s) for n in (1, 2) for s in ("Cleveland", "Hungary")
    }
    for name in ("Cleveland", "Hungary"):  # each site's ledger holds the four stages, twice
        kinds = {e["message_type"] for e in _ledger_lines(tmp_path / name)}
        stages = {"query.secagg_keys", "query.secagg_shares", "query.secagg_unmask"}
        assert stages | {"train", "evaluate"} <= kinds
