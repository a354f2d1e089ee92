"""The site worker without a network: the app identity check on real FAB bytes (built by
Flower's own FAB builder), the refusal reply, the answer to one task, and the processes
``fedpeft site start`` runs."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.cli.build import build_fab_from_disk
from flwr.clientapp import ClientApp
from flwr.supercore.fab import Fab
from flwr.supercore.task_identity import TaskIdentity

from fedpeft import processes
from fedpeft.client import worker
from fedpeft.client.setup import SiteSetup
from fedpeft.common import crypto, keys
from fedpeft.common.config import DataSchema, RunConfig
from fedpeft.common.trust import SiteTrust
from fedpeft.runs import write_app
from fedpeft.settings import load_site_config

EVIL_APP = Path(__file__).parent / "evil_app"
ECHO = ClientApp()


@ECHO.train()
def _echo(msg: Any, context: Any) -> Any:
    return Message(RecordDict({"echo": ConfigRecord({"site": "warm"})}), reply_to=msg)


def _fab(folder: Path) -> Fab:
    content = build_fab_from_disk(folder)
    return Fab(hashlib.sha256(content).hexdigest(), content, {})


@pytest.fixture(scope="module")
def fedpeft_fab(tmp_path_factory: pytest.TempPathFactory) -> Fab:
    """The FAB `fedpeft run start` submits, built by Flower."""
    return _fab(write_app(tmp_path_factory.mktemp("app"), RunConfig()))


@pytest.fixture(scope="module")
def evil_fab() -> Fab:
    return _fab(EVIL_APP)


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the worker sets from each task's input (replies read it)."""
    for name, value in (("_task_id", 3), ("_run_id", 1), ("_node_id", 7)):
        monkeypatch.setattr(TaskIdentity, name, value)


def _setup(allowed: tuple[str, ...] = worker.DEFAULT_ALLOWED_APPS) -> SiteSetup:
    key = crypto.new_identity()
    trust = SiteTrust(key, key.public_key())
    return SiteSetup(
        "Cleveland", Path("/secret/site/records.csv"), DataSchema(), "cpu", trust, None, allowed
    )


def _message() -> Message:
    return Message(RecordDict(), dst_node_id=7, message_type="train")


def _context(site: str = "Cleveland") -> Context:
    return Context(
        run_id=1,
        node_id=7,
        node_config={keys.NODE_SITE: site, keys.NODE_SITE_SETUP: "/secret/site/site-setup.json"},
        state=RecordDict(),
        run_config={},
    )


def test_the_fedpeft_app_is_allowed_and_another_clientapp_is_refused_by_name(
    fedpeft_fab: Fab, evil_fab: Fab
) -> None:
    allowed = worker.DEFAULT_ALLOWED_APPS
    assert worker.check_app(fedpeft_fab.content, fedpeft_fab.hash_str, allowed) == (
        "fedpeft.client.app:app"
    )
    assert worker.fab_clientapp(evil_fab.content) == "evil_client:app"
    with pytest.raises(worker.AppRefused, match=r"app 'evil_client:app' is not allowed"):
        worker.check_app(evil_fab.content, evil_fab.hash_str, allowed)
    # A site policy can allow another reference, and only that one.
    assert worker.check_app(evil_fab.content, "", ["evil_client:app"]) == "evil_client:app"
    with pytest.raises(worker.AppRefused):
        worker.check_app(fedpeft_fab.content, "", ["evil_client:app"])
    assert "evil_client" not in sys.modules


def _zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"not a zip", "no readable pyproject"),
        (_zip({"other.toml": b""}), "no readable pyproject"),
        (_zip({"pyproject.toml": b"[tool.flwr.app"}), "no readable pyproject"),
        (_zip({"pyproject.toml": b"\xff\xfe"}), "no readable pyproject"),
        (_zip({"pyproject.toml": b"[tool.flwr.app.components]\nserverapp = 'x:y'\n"}), "no client"),
        (_zip({"pyproject.toml": b"[tool.flwr.app.components]\nclientapp = 3\n"}), "no client"),
        (_zip({"pyproject.toml": b"tool = 1\n"}), "no clientapp"),
        (_zip({"pyproject.toml": b"#" * (worker.MAX_PYPROJECT_BYTES + 1)}), "too large"),
    ],
)
def test_a_bundle_without_a_readable_clientapp_is_refused(content: bytes, match: str) -> None:
    with pytest.raises(worker.AppRefused, match=match):
        worker.check_app(content, "", worker.DEFAULT_ALLOWED_APPS)


def test_a_bundle_that_does_not_match_its_hash_is_refused(fedpeft_fab: Fab) -> None:
    with pytest.raises(worker.AppRefused, match="does not match its hash"):
        worker.check_app(fedpeft_fab.content, "0" * 64, worker.DEFAULT_ALLOWED_APPS)


def test_only_allowed_references_are_ever_imported() -> None:
    with pytest.raises(worker.AppRefused):
        worker.load_allowed_app("evil_client:app", worker.DEFAULT_ALLOWED_APPS)
    assert "evil_client" not in sys.modules
    ref = f"{__name__}:ECHO"
    assert worker.load_allowed_app(ref, [ref]) is ECHO


def test_a_refused_task_gets_a_refusal_naming_the_app_and_no_local_path(
    evil_fab: Fab,
) -> None:
    msg = _message()
    reply, account = worker.answer(msg, _context(), evil_fab, _setup())
    info = reply.content[keys.CONFIG]
    assert info[keys.STATUS] == "refused" and info[keys.SITE] == "Cleveland"
    assert info[keys.ERROR] == "app 'evil_client:app' is not allowed at this site"
    assert "/secret" not in info[keys.ERROR] and str(EVIL_APP) not in info[keys.ERROR]
    assert account.startswith("refused: ")
    assert reply.metadata.reply_to_message_id == msg.metadata.message_id
    assert "evil_client" not in sys.modules


def test_an_allowed_task_is_answered_by_the_installed_app(tmp_path: Path) -> None:
    ref = f"{__name__}:ECHO"
    (tmp_path / "pyproject.toml").write_text(
        '[project]\nname = "x"\nversion = "0.1.0"\n[tool.flwr.app]\npublisher = "t"\n'
        f'[tool.flwr.app.components]\nserverapp = "a:b"\nclientapp = "{ref}"\n'
    )
    reply, account = worker.answer(_message(), _context(), _fab(tmp_path), _setup((ref,)))
    assert reply.content["echo"]["site"] == "warm" and account == f"answered with {ref}"


def test_fedpeft_s_app_is_handed_the_site_s_setup_other_apps_flower_s_context(
    fedpeft_fab: Fab, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker calls fedpeft's handler with the setup it built from site.toml (the site's
    schema, device, keys), not the ClientApp with a node config."""
    import fedpeft.client.app as site_app

    got: list[Any] = []
    monkeypatch.setattr(site_app, "handle", lambda msg, setup: got.append(setup) or "reply")
    worker._LOADED.pop("fedpeft.client.app:handle", None)
    setup = _setup()
    try:
        reply, account = worker.answer(_message(), _context(), fedpeft_fab, setup)
    finally:
        worker._LOADED.pop("fedpeft.client.app:handle", None)
    assert (reply, account, got) == ("reply", "answered with fedpeft.client.app:app", [setup])
    ref = f"{__name__}:ECHO"
    assert worker.site_handler(ref, [ref]) is None


def _site_toml(tmp_path: Path) -> Path:
    for name in ("ca.crt", "A.key", "c.pub", "records.csv"):
        (tmp_path / name).write_text("x")
    toml = tmp_path / "site.toml"
    toml.write_text(
        '[site]\nname = "A"\ncoordinator = "127.0.0.1:1"\nca = "ca.crt"\n'
        'identity_key = "A.key"\ncoordinator_key = "c.pub"\ndata = "records.csv"\n'
        "api_port = 9123\n"
    )
    return toml


def test_site_start_runs_the_supernode_without_executor_and_the_worker_beside_it(
    tmp_path: Path,
) -> None:
    cfg = load_site_config(_site_toml(tmp_path))
    secret = processes.write_auth_secret(tmp_path / "home")
    node = processes.supernode_command(cfg, insecure=False, auth_secret_file=secret)
    assert node[node.index("--isolation") + 1] == "process"
    assert node[node.index("--host") + 1] == "127.0.0.1"
    assert node[node.index("--port") + 1] == "9123"
    assert node[node.index("--superexec-auth-secret-file") + 1] == str(secret)
    setup = processes.write_site_setup(cfg, tmp_path / "home")
    work = processes.worker_command(cfg, secret, ["fedpeft.client.app:app"], setup_file=setup)
    assert work[:3] == [sys.executable, "-m", "fedpeft.client.worker"]
    assert work[work.index("--site-setup") + 1] == str(setup)
    assert work[work.index("--runtime-api-address") + 1] == "127.0.0.1:9123"
    assert work[work.index("--superexec-auth-secret-file") + 1] == str(secret)
    assert work[work.index("--allow-app") + 1] == "fedpeft.client.app:app"
    assert work[work.index("--parent-pid") + 1] == str(os.getpid())
    # The benchmark's stock mode: Flower's own executor, no secret.
    legacy = processes.supernode_command(cfg, insecure=False, worker=False)
    assert "--isolation" not in legacy and "--superexec-auth-secret-file" not in legacy


def test_the_superexec_secret_is_random_private_and_new_at_every_start(tmp_path: Path) -> None:
    first = processes.write_auth_secret(tmp_path)
    one = first.read_bytes()
    assert stat.S_IMODE(first.stat().st_mode) == 0o600 and len(one) == 32
    assert processes.write_auth_secret(tmp_path).read_bytes() != one


def test_a_dead_worker_is_restarted_and_the_supernode_decides_the_exit_code(
    tmp_path: Path,
) -> None:
    said: list[str] = []
    code = processes.supervise_site(
        [sys.executable, "-c", "import time, sys; time.sleep(4); sys.exit(5)"],
        [sys.executable, "-c", "import sys; sys.exit(3)"],
        processes.child_env(),
        tmp_path,
        said.append,
        max_backoff=1.0,
    )
    assert code == 5
    restarts = [s for s in said if s.startswith("site worker exited with code 3")]
    assert len(restarts) >= 2, said
    assert said[-1] == "SuperNode exited with code 5"
