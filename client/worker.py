"""The site worker: a long-lived process that answers the SuperNode's tasks with the site's
**installed** ClientApp, in-process, instead of Flower's ``flwr-clientapp`` per message.

Stock Flower 1.39 starts a fresh ``flwr-clientapp`` for every message; it installs the app bundle
(FAB) the coordinator shipped and imports the ClientApp that bundle names, so whoever controls
the coordinator runs code at every site, and every message reloads torch and the model. With the
SuperNode in ``--isolation process`` no executor is started; this worker takes its place, speaking
the same SuperExec task protocol over the SuperNode's local runtime API (the steps of
``flwr/supernode/runtime/run_clientapp.py``):

1. ``AcquireTask`` for the task type ``flwr-clientapp`` (signed with the SuperExec secret that the
   SuperNode was given, so no other local process can take the site's tasks);
2. with the task token: heartbeats while the task runs (a running task without one for 60 s is
   failed by the SuperNode), ``PullTaskInput`` (context, run, FAB) and ``PullMessages``;
3. the FAB's ``pyproject.toml`` is read **as data** (never extracted, installed or imported):
   unless its ClientApp reference is one the site allows, the task is answered with a refusal;
   otherwise the allowed app, imported from what the site installed, handles the message:
   fedpeft's own with the site's setup (client/setup.py: read once at start from the setup file
   ``fedpeft site start`` writes from site.toml), any other allowed ClientApp through Flower's
   context (its node config names the same file);
4. ``PushMessages`` (the reply) and ``PushTaskOutput`` (the task status and context).

The model, tokenizer and tokenized rows stay in this process between messages and rounds
(``fedpeft.client.app``'s session cache). Every Flower name used here is pinned by
tests/test_flower_contract.py.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import io
import logging
import signal
import sys
import threading
import time
import tomllib
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpeft.client.setup import DEFAULT_ALLOWED_APPS, SiteSetup, read_setup_file, site_name
from fedpeft.common.errors import FedpeftError
from fedpeft.common.keys import SiteStatus

log = logging.getLogger("fedpeft.worker")

#: Allowed ClientApps whose message handler takes the site's setup directly, by reference.
SITE_HANDLERS = {"fedpeft.client.app:app": "fedpeft.client.app:handle"}
#: Flower's task type for a ClientApp task ("clientapp" silently matches nothing).
CLIENT_APP_TASK = "flwr-clientapp"
#: Runtime API methods signed with the SuperExec secret (Flower's run_superexec.py protects
#: the same three).
SUPEREXEC_AUTH_METHODS = frozenset(
    {
        "/flwr.proto.Runtime/AcquireTask",
        "/flwr.proto.Runtime/PullPendingTasks",
        "/flwr.proto.Runtime/ClaimTask",
    }
)
#: A FAB's pyproject.toml is a few hundred bytes; anything far larger is not read.
MAX_PYPROJECT_BYTES = 256 * 1024


class AppRefused(FedpeftError):
    """The run's app is not one this site allows. The message names the app reference only."""


def fab_clientapp(content: bytes, fab_hash: str = "") -> str:
    """The ClientApp reference (``module:attribute``) that a FAB's ``pyproject.toml`` names, read
    as data: the zip is never extracted and nothing in it is imported. ``AppRefused`` if the
    bytes do not match ``fab_hash`` (when given), are not a zip, or hold no readable reference."""
    if fab_hash and hashlib.sha256(content).hexdigest() != fab_hash:
        raise AppRefused("the app bundle does not match its hash")
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as fab:
            info = fab.getinfo("pyproject.toml")
            if info.file_size > MAX_PYPROJECT_BYTES:
                raise AppRefused("the app bundle's pyproject.toml is too large")
            with fab.open(info) as f:
                raw = f.read(MAX_PYPROJECT_BYTES + 1)
        if len(raw) > MAX_PYPROJECT_BYTES:
            raise AppRefused("the app bundle's pyproject.toml is too large")
        project = tomllib.loads(raw.decode("utf-8"))
    except AppRefused:
        raise
    except (zipfile.BadZipFile, KeyError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise AppRefused(
            f"the app bundle has no readable pyproject.toml ({type(exc).__name__})"
        ) from None
    ref: Any = project
    for key in ("tool", "flwr", "app", "components", "clientapp"):
        ref = ref.get(key) if isinstance(ref, dict) else None
    if not isinstance(ref, str) or not ref:
        raise AppRefused("the app bundle names no clientapp")
    return ref


def check_app(content: bytes, fab_hash: str, allowed: Sequence[str]) -> str:
    """The FAB's ClientApp reference if the site allows it; ``AppRefused`` naming it if not."""
    ref = fab_clientapp(content, fab_hash)
    if ref not in allowed:
        raise AppRefused(f"app {ref!r} is not allowed at this site")
    return ref


_LOADED: dict[str, Any] = {}


def _import(ref: str) -> Any:
    if ref not in _LOADED:
        module, _, attribute = ref.partition(":")
        _LOADED[ref] = getattr(importlib.import_module(module), attribute or "app")
    return _LOADED[ref]


def load_allowed_app(ref: str, allowed: Sequence[str]) -> Any:
    """The installed ClientApp object ``ref`` names, imported from this site's own Python path
    (never from a FAB); only references in ``allowed`` are ever imported."""
    if ref not in allowed:
        raise AppRefused(f"app {ref!r} is not allowed at this site")
    return _import(ref)


def site_handler(ref: str, allowed: Sequence[str]) -> Callable[[Any, SiteSetup], Any] | None:
    """The handler that takes the site's setup for the allowed app ``ref``
    (:data:`SITE_HANDLERS`); None for a ClientApp that only takes Flower's context."""
    load_allowed_app(ref, allowed)
    return _import(SITE_HANDLERS[ref]) if ref in SITE_HANDLERS else None


@dataclass(frozen=True)
class WorkerSettings:
    """How the worker reaches its SuperNode and what it runs."""

    #: The SuperNode's runtime API, HOST:PORT (loopback).
    runtime_address: str
    #: The site's own settings (from site.toml), its allowed ClientApps among them.
    setup: SiteSetup
    #: The SuperExec secret the SuperNode was started with; None when it has none.
    auth_secret: bytes | None = None
    #: Seconds between two AcquireTask calls when there is no task (a local HTTP call).
    poll_interval: float = 0.2


def _runtime_client(address: str, interceptors: list[Any]) -> Any:
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    return RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=True,  # loopback only: the SuperNode's runtime API listens on 127.0.0.1
        root_certificates=None,
        interceptors=interceptors,
        retry_invoker=make_simple_http_retry_invoker(),
    )


def acquire_client(settings: WorkerSettings) -> Any:
    """A runtime API client that signs AcquireTask with the SuperExec secret."""
    from flwr.supercore.interceptors import (
        RuntimeVersionHttpInterceptor,
        SuperExecAuthHttpInterceptor,
    )

    interceptors: list[Any] = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
    if settings.auth_secret:
        interceptors.append(
            SuperExecAuthHttpInterceptor(
                master_secret=settings.auth_secret, protected_methods=SUPEREXEC_AUTH_METHODS
            )
        )
    return _runtime_client(settings.runtime_address, interceptors)


def acquire_task(client: Any) -> str | None:
    """The token of the oldest pending ClientApp task, claimed; None when there is none."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest

    res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[CLIENT_APP_TASK]))
    return str(res.token) if res.HasField("task") and res.token else None


def _heartbeat_fn(client: Any) -> Callable[[], bool]:
    """Like Flower's ``make_task_heartbeat_fn_http`` but without its SIGINT when the task is
    gone: this process outlives its tasks, so a lost task is only logged."""
    import httpx
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest

    def beat() -> bool:
        try:
            res = client.SendTaskHeartbeat(SendTaskHeartbeatRequest())
        except httpx.HTTPError:
            return False  # retried by HeartbeatSender with backoff
        if not res.success:
            log.warning("the SuperNode no longer knows this task (heartbeat refused)")
        return True

    return beat


#: Seconds the worker waits for a task's message to arrive from its SuperNode before it gives
#: the task up (failed) and serves the next one.
TASK_PULL_MAX_S = 60.0


def pull_task_input(client: Any) -> tuple[Any, Any, Any, Any]:
    """The task's message, context, run and FAB (as ``run_clientapp.pull_task_input``)."""
    from flwr.app import Message
    from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
    from flwr.proto.node_pb2 import Node
    from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf,
        make_pull_object_fn_protobuf,
    )
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
    from flwr.supercore.task_identity import TaskIdentity

    res = client.PullTaskInput(PullTaskInputRequest())
    # Process-wide in Flower (a reply's metadata reads it): set anew for every task, since this
    # process serves one task after another, of any run.
    TaskIdentity.task_id = res.task_id
    TaskIdentity.run_id = res.run.run_id
    TaskIdentity.node_id = res.context.node_id
    context = context_from_proto(res.context)
    run = run_from_proto(res.run)
    fab = fab_from_proto(res.fab)
    pulled = client.PullMessages(PullAppMessagesRequest())
    if not pulled.messages_list:
        raise RuntimeError("the task has no message")
    node = Node(node_id=context.node_id)
    tree = pulled.message_object_trees[0]
    message = pull_and_inflate_object_from_tree(
        tree,
        make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
        make_confirm_message_received_fn_protobuf(
            client.ConfirmMessageReceived, node, context.run_id
        ),
        return_type=Message,
        # Flower waits up to 2 h for an object; a message whose run stopped meanwhile (the
        # SuperNode ignores and drops it) would hold this worker, and the site, that long.
        max_time=TASK_PULL_MAX_S,
    )
    # The deflated message does not carry its own id (its object id): Flower sets it the same way.
    message.metadata.__dict__["_message_id"] = tree.object_id
    return message, context, run, fab


def push_reply(client: Any, message: Any, context: Any) -> None:
    """Push the reply message and its objects (as ``run_clientapp.push_message``)."""
    from flwr.app.message import remove_content_from_message
    from flwr.common.serde import message_to_proto
    from flwr.proto.node_pb2 import Node
    from flwr.proto.runtime_pb2 import PushAppMessagesRequest
    from flwr.supercore.inflatable.inflatable_object import (
        get_all_nested_objects,
        get_object_tree,
        no_object_id_recompute,
    )
    from flwr.supercore.inflatable.inflatable_protobuf_utils import make_push_object_fn_protobuf
    from flwr.supercore.inflatable.inflatable_utils import push_objects

    message.metadata.__dict__["_message_id"] = message.object_id
    proto = message_to_proto(remove_content_from_message(message))
    with no_object_id_recompute():
        tree = get_object_tree(message)
        res = client.PushMessages(
            PushAppMessagesRequest(messages_list=[proto], message_object_trees=[tree])
        )
        push_objects(
            get_all_nested_objects(message),
            make_push_object_fn_protobuf(
                client.PushObject,
                Node(node_id=context.node_id),
                run_id=context.run_id,
                session_id=res.session_id,
            ),
            object_ids_to_push=set(res.objects_to_push),
        )


def push_task_output(client: Any, context: Any, sub_status: str, details: str) -> None:
    """The task's final status and context (``context.state`` persists across a run's rounds)."""
    from flwr.common.serde import context_to_proto
    from flwr.proto.runtime_pb2 import PushTaskOutputRequest

    client.PushTaskOutput(
        PushTaskOutputRequest(
            context=context_to_proto(context) if context is not None else None,
            sub_status=sub_status,
            details=details,
        )
    )


def answer(message: Any, context: Any, fab: Any, setup: SiteSetup) -> tuple[Any, str]:
    """The reply to one task's message and a one-line account of it: a refusal unless the FAB
    names an app the site allows (written to the site's ledger), else that app's own reply
    (fedpeft's with ``setup``; it keeps the ledger itself)."""
    from fedpeft.client.app import TaskRecord, error_reply

    allowed = setup.allowed_apps
    try:
        ref = check_app(fab.content, fab.hash_str, allowed)
    except AppRefused as exc:
        log.warning("refused a task of run %s: %s", context.run_id, exc)
        status, error = TaskRecord.of(setup.ledger, message).refused(SiteStatus.REFUSED, str(exc))
        reply = error_reply(message, site_name(dict(context.node_config)), status, error)
        return reply, f"{status}: {error}"
    handler = site_handler(ref, allowed)
    if handler is not None:
        return handler(message, setup), f"answered with {ref}"
    # Another app the site installed and allows: fedpeft's wrapped (a test's site_dump) keeps the
    # ledger through fedpeft's handler, with the setup its node config names.
    app = load_allowed_app(ref, allowed)
    return app(message=message, context=context), f"answered with {ref}"


def run_task(settings: WorkerSettings, token: str) -> None:
    """Run one claimed task to its end: reply and status pushed, whatever happens in between."""
    from flwr.app import Message
    from flwr.app.error import Error
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.supercore.heartbeat import HeartbeatSender
    from flwr.supercore.interceptors import (
        RuntimeTokenHttpInterceptor,
        RuntimeVersionHttpInterceptor,
    )

    client = _runtime_client(
        settings.runtime_address,
        [
            RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
            RuntimeTokenHttpInterceptor(token),
        ],
    )
    heartbeat = HeartbeatSender(_heartbeat_fn(client))
    message = context = reply = None
    sub_status, details = SubStatus.FAILED, "the site worker failed"
    started = time.monotonic()
    try:
        heartbeat.start()
        message, context, _run, fab = pull_task_input(client)
        reply, details = answer(message, context, fab, settings.setup)
        sub_status = SubStatus.COMPLETED
    except Exception as exc:  # the SuperNode must still get a reply and a status
        log.exception("task failed")
        details = f"{type(exc).__name__} in the site worker"
        if message is not None:
            reply = Message(
                Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details),
                reply_to=message,
            )
    finally:
        try:
            if reply is not None and context is not None:
                push_reply(client, reply, context)
            push_task_output(
                client, context, sub_status, "" if sub_status == "completed" else details
            )
        except Exception:
            log.exception("could not push the task's reply or status")
        if heartbeat.is_running:
            heartbeat.stop()
        client.close()
    log.info(
        "%s message of run %s: %s (%.1f s)",
        getattr(getattr(message, "metadata", None), "message_type", "?"),
        getattr(context, "run_id", "?"),
        details,
        time.monotonic() - started,
    )


def serve(settings: WorkerSettings, stop: threading.Event | None = None) -> None:
    """Acquire and run tasks until ``stop`` is set; an unreachable SuperNode is waited for."""
    import httpx

    stop = stop or threading.Event()
    client = acquire_client(settings)
    unreachable_since: float | None = None
    try:
        while not stop.is_set():
            try:
                token = acquire_task(client)
            except httpx.HTTPError as exc:
                if unreachable_since is None:
                    unreachable_since = time.monotonic()
                    log.warning("SuperNode runtime API not reachable yet (%s); waiting", exc)
                stop.wait(max(settings.poll_interval, 1.0))
                continue
            if unreachable_since is not None:
                log.info("SuperNode runtime API reachable")
                unreachable_since = None
            if token is None:
                stop.wait(settings.poll_interval)
                continue
            run_task(settings, token)
    finally:
        client.close()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fedpeft.client.worker",
        description="fedpeft's site worker: answers the SuperNode's tasks with the installed "
        "ClientApp (started by `fedpeft site start`).",
    )
    p.add_argument("--runtime-api-address", required=True, help="the SuperNode's HOST:PORT")
    p.add_argument(
        "--site-setup",
        type=Path,
        required=True,
        help="the site's setup file (fedpeft site start writes it from site.toml)",
    )
    p.add_argument("--superexec-auth-secret-file", type=Path, default=None)
    p.add_argument(
        "--allow-app",
        action="append",
        default=None,
        help="a ClientApp reference this site runs (repeatable; default: the site policy's "
        f"apps, {DEFAULT_ALLOWED_APPS[0]} unless site.toml says otherwise)",
    )
    p.add_argument("--poll-interval", type=float, default=0.2)
    p.add_argument("--parent-pid", type=int, default=None, help="exit when this process ends")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="[fedpeft worker %(asctime)s] %(levelname)s %(message)s"
    )
    # httpx logs every request at INFO: one line per task poll (5 a second) in the site's log.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    secret = None
    if args.superexec_auth_secret_file is not None:
        secret = args.superexec_auth_secret_file.read_bytes()
    try:
        setup = read_setup_file(args.site_setup, tuple(args.allow_app) if args.allow_app else None)
    except FedpeftError as exc:
        log.error("site settings: %s", exc)
        return 2
    settings = WorkerSettings(
        runtime_address=args.runtime_api_address,
        setup=setup,
        auth_secret=secret,
        poll_interval=args.poll_interval,
    )
    if args.parent_pid is not None:
        from flwr.supercore.app_utils import start_parent_process_monitor

        start_parent_process_monitor(args.parent_pid)

    def leave(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)  # a running task still pushes its status on the way out

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, leave)
    allowed = setup.allowed_apps
    for ref in allowed:  # import torch and the app before the first task arrives
        try:
            site_handler(ref, allowed)
        except Exception:
            log.exception("allowed app %s cannot be imported at this site", ref)
    log.info(
        "serving %s at %s (allowed apps: %s)",
        CLIENT_APP_TASK,
        settings.runtime_address,
        ", ".join(allowed),
    )
    serve(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
