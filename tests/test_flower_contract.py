"""The Flower 1.39 internals the site worker (client/worker.py) and ``fedpeft site start`` rely
on. These are not Flower's public API: when an upgrade changes one, this file fails and says
what changed, before a site silently stops answering."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import flwr
import pytest


def _params(fn: Callable[..., Any]) -> list[str]:
    return list(inspect.signature(fn).parameters)


def _fields(message: type) -> set[str]:
    return set(message.DESCRIPTOR.fields_by_name)  # type: ignore[attr-defined]


def test_flower_is_the_version_the_worker_was_written_against() -> None:
    assert flwr.__version__.startswith("1.39."), (
        f"Flower is {flwr.__version__}: re-read supernode/runtime/run_clientapp.py and "
        "supercore/superexec/run_superexec.py against client/worker.py, then update this file"
    )


def test_the_client_app_task_type_and_isolation_modes() -> None:
    from flwr.common.constant import ISOLATION_MODE_PROCESS, ErrorCode, SubStatus
    from flwr.supercore.constant import UVICORN_DEFAULT_HOST, TaskType

    from fedpeft.client.worker import CLIENT_APP_TASK

    assert TaskType.CLIENT_APP == CLIENT_APP_TASK == "flwr-clientapp", (
        "the ClientApp task type changed: the worker would acquire nothing"
    )
    assert ISOLATION_MODE_PROCESS == "process", "SuperNode --isolation values changed"
    assert UVICORN_DEFAULT_HOST == "127.0.0.1", "the runtime API's default host changed"
    assert (SubStatus.COMPLETED, SubStatus.FAILED) == ("completed", "failed"), (
        "task sub-statuses changed"
    )
    assert hasattr(ErrorCode, "CLIENT_APP_RAISED_EXCEPTION"), "ErrorCode lost the ClientApp code"


def test_the_runtime_api_requests_and_responses_have_the_fields_the_worker_uses() -> None:
    from flwr.proto import runtime_pb2 as rt

    expected = {
        rt.AcquireTaskRequest: {"supported_task_types"},
        rt.AcquireTaskResponse: {"task", "token"},
        rt.PullTaskInputResponse: {"context", "run", "fab", "task_id"},
        rt.PullAppMessagesResponse: {"messages_list", "message_object_trees"},
        rt.PushAppMessagesRequest: {"messages_list", "message_object_trees"},
        rt.PushAppMessagesResponse: {"objects_to_push", "session_id"},
        rt.PushTaskOutputRequest: {"context", "sub_status", "details"},
        rt.SendTaskHeartbeatResponse: {"success"},
    }
    for message, fields in expected.items():
        missing = fields - _fields(message)
        assert not missing, f"runtime_pb2.{message.__name__} lost {sorted(missing)}"
    for name in ("PullTaskInputRequest", "PullAppMessagesRequest", "SendTaskHeartbeatRequest"):
        assert hasattr(rt, name), f"runtime_pb2.{name} is gone"
    from flwr.proto.node_pb2 import Node

    assert "node_id" in _fields(Node), "Node lost node_id"


def test_the_runtime_http_client_has_every_call_the_worker_makes() -> None:
    from flwr.supercore.runtime import RuntimeHttpClient

    for method in (
        "AcquireTask",
        "SendTaskHeartbeat",
        "PullTaskInput",
        "PullMessages",
        "PullObject",
        "ConfirmMessageReceived",
        "PushMessages",
        "PushObject",
        "PushTaskOutput",
        "close",
    ):
        assert callable(getattr(RuntimeHttpClient, method, None)), (
            f"RuntimeHttpClient.{method} is gone"
        )
    params = _params(RuntimeHttpClient.from_server_address)
    assert params == [
        "server_address",
        "insecure",
        "root_certificates",
        "interceptors",
        "retry_invoker",
    ], f"RuntimeHttpClient.from_server_address takes {params}"


def test_the_interceptors_heartbeat_and_auth_the_worker_builds() -> None:
    from flwr.supercore.heartbeat import HeartbeatSender
    from flwr.supercore.interceptors import (
        RuntimeTokenHttpInterceptor,
        RuntimeVersionHttpInterceptor,
        SuperExecAuthHttpInterceptor,
    )
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.superexec import run_superexec

    from fedpeft.client.worker import SUPEREXEC_AUTH_METHODS

    assert _params(RuntimeTokenHttpInterceptor.__init__)[1:] == ["token"]
    assert _params(RuntimeVersionHttpInterceptor.__init__)[1:] == ["component_name"]
    assert _params(SuperExecAuthHttpInterceptor.__init__)[1:] == [
        "master_secret",
        "protected_methods",
    ], "SuperExec auth interceptor's arguments changed"
    assert run_superexec._SUPEREXEC_AUTH_METHODS == SUPEREXEC_AUTH_METHODS, (
        "Flower signs a different set of runtime methods for SuperExec auth"
    )
    assert _params(HeartbeatSender.__init__)[1:] == ["heartbeat_fn"]
    assert all(hasattr(HeartbeatSender, a) for a in ("start", "stop", "is_running"))
    assert callable(make_simple_http_retry_invoker)


def test_a_running_task_needs_a_heartbeat_within_a_minute() -> None:
    from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL, HEARTBEAT_PATIENCE

    # A running task without a heartbeat for PATIENCE * INTERVAL seconds is failed and its
    # message answered with an error: the worker must keep sending them while training.
    assert HEARTBEAT_PATIENCE * HEARTBEAT_DEFAULT_INTERVAL == 60


def test_the_serde_and_object_tree_helpers_the_worker_calls() -> None:
    from flwr.app.message import remove_content_from_message
    from flwr.common import serde
    from flwr.supercore.app_utils import start_parent_process_monitor
    from flwr.supercore.fab import Fab
    from flwr.supercore.inflatable import inflatable_object as obj
    from flwr.supercore.inflatable import inflatable_protobuf_utils as pb_utils
    from flwr.supercore.inflatable import inflatable_utils as utils
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("context_from_proto", "context_to_proto", "fab_from_proto", "run_from_proto"):
        assert callable(getattr(serde, name, None)), f"flwr.common.serde.{name} is gone"
    assert callable(serde.message_to_proto) and callable(remove_content_from_message)
    for module, names in (
        (obj, ("get_all_nested_objects", "get_object_tree", "no_object_id_recompute")),
        (
            pb_utils,
            (
                "make_confirm_message_received_fn_protobuf",
                "make_pull_object_fn_protobuf",
                "make_push_object_fn_protobuf",
            ),
        ),
        (utils, ("pull_and_inflate_object_from_tree", "push_objects")),
    ):
        for name in names:
            assert callable(getattr(module, name, None)), f"{module.__name__}.{name} is gone"
    assert _params(utils.push_objects)[:2] == ["objects", "push_object_fn"], (
        f"push_objects takes {_params(utils.push_objects)}"
    )
    assert "object_ids_to_push" in _params(utils.push_objects)
    assert {"return_type", "max_time"} <= set(_params(utils.pull_and_inflate_object_from_tree))
    assert _params(start_parent_process_monitor) == ["parent_pid"]
    fab = Fab("h", b"c", {})
    assert (fab.hash_str, fab.content) == ("h", b"c"), "Fab's fields changed"
    for name in ("task_id", "run_id", "node_id"):
        assert isinstance(getattr(type(TaskIdentity), name, None), property), (
            f"TaskIdentity.{name} changed: replies read it"
        )


@pytest.mark.parametrize(
    "flag", ["--isolation", "--host", "--port", "--superexec-auth-secret-file"]
)
def test_the_supernode_takes_the_flags_site_start_gives_it(flag: str) -> None:
    from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

    options = {o for a in _parse_args_run_supernode()._actions for o in a.option_strings}
    assert flag in options, f"flower-supernode no longer takes {flag}"


def test_the_clientapp_is_called_with_message_and_context() -> None:
    from flwr.clientapp import ClientApp

    assert _params(ClientApp.__call__)[1:] == ["message", "context"]


def test_the_fab_builder_the_tests_use() -> None:
    from flwr.cli.build import build_fab_from_disk

    assert _params(build_fab_from_disk) == ["app"]
