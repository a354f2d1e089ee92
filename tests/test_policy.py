"""The site policy: site.toml's [policy] table, check_task's rules, the upload size a site computes
before training, and approved runs (manifest -> site approve -> check)."""

from __future__ import annotations

import dataclasses
import json
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedpeft.client.approvals import approve, read_approval_list, read_approvals
from fedpeft.client.policy import (
    PolicyRefusal,
    SitePolicy,
    TaskFacts,
    check_task,
    check_upload,
    default_methods,
    expected_upload_bytes,
    read_coordinator_keys,
)
from fedpeft.common import crypto
from fedpeft.common.envelope import seal_delta
from fedpeft.common.errors import ConfigError
from fedpeft.common.manifest import RunManifest, config_hash, sealed_size_bound
from fedpeft.common.methods import method_names
from fedpeft.common.wire import CODECS
from fedpeft.settings import load_site_config, site_approvals_path

SITE = (
    '[site]\nname = "A"\ncoordinator = "127.0.0.1:1"\nca = "ca.crt"\n'
    'identity_key = "A.key"\ncoordinator_key = "c.pub"\ndata = "records.csv"\n'
)


def _site(tmp_path: Path, policy: str = "") -> Path:
    for name in ("ca.crt", "A.key", "c.pub", "c2.pub", "records.csv"):
        (tmp_path / name).write_text("x")
    toml = tmp_path / "site.toml"
    toml.write_text(SITE + policy)
    return toml


# -- site.toml [policy] ------------------------------------------------------------------------


def test_the_defaults_are_the_safe_ones(tmp_path: Path) -> None:
    policy = load_site_config(_site(tmp_path)).policy
    assert policy.coordinator_keys == (tmp_path / "c.pub",)
    assert "full" not in policy.methods and "lora" in policy.methods
    assert policy.methods == tuple(m for m in method_names() if m != "full") == default_methods()
    assert (policy.max_local_epochs, policy.max_rounds) == (5, 100)
    assert policy.codecs == ("fp32", "fp16", "int8")
    assert policy.max_upload_bytes == 8 * 1024 * 1024
    assert policy.apps == ("fedpeft.client.app:app",)
    assert not (policy.require_secure_aggregation or policy.require_dp)
    assert not policy.approved_runs_only
    assert policy.approvals == tmp_path / "approved-runs.jsonl"


def test_every_setting_is_read(tmp_path: Path) -> None:
    (tmp_path / "appr").mkdir()
    toml = _site(
        tmp_path,
        '[policy]\ncoordinator_keys = ["c.pub", "c2.pub"]\nmethods = ["lora", "full"]\n'
        'max_local_epochs = 2\nmax_rounds = 7\ncodecs = ["int8"]\nmax_upload_bytes = 1000\n'
        'apps = ["fedpeft.client.app:app", "site_dump:app"]\nrequire_secure_aggregation = true\n'
        'require_dp = true\napproved_runs_only = true\napprovals = "appr/ok.jsonl"\n',
    )
    assert load_site_config(toml).policy == SitePolicy(
        coordinator_keys=(tmp_path / "c.pub", tmp_path / "c2.pub"),
        methods=("lora", "full"),
        max_local_epochs=2,
        max_rounds=7,
        codecs=("int8",),
        max_upload_bytes=1000,
        apps=("fedpeft.client.app:app", "site_dump:app"),
        require_secure_aggregation=True,
        require_dp=True,
        approved_runs_only=True,
        approvals=tmp_path / "appr/ok.jsonl",
    )
    assert site_approvals_path(toml) == tmp_path / "appr/ok.jsonl"


def test_every_bad_value_is_named_with_file_table_and_key(tmp_path: Path) -> None:
    toml = _site(
        tmp_path,
        '[policy]\ncoordinator_keys = ["nope.pub"]\nmethods = ["lora", "magic"]\n'
        'max_local_epochs = 0\nmax_rounds = "many"\ncodecs = ["fp8"]\nmax_upload_bytes = -1\n'
        'apps = ["not a reference"]\nrequire_secure_aggregation = "yes"\nrequire_dp = 1\n'
        'approved_runs_only = "no"\napprovals = "gone/a.jsonl"\ncolour = "red"\n',
    )
    with pytest.raises(ConfigError) as err:
        load_site_config(toml)
    at = f"{toml}: [policy]"
    expected = [
        f"{at} coordinator_keys: {tmp_path / 'nope.pub'}: no such file",
        f"{at} methods: unknown 'magic'; known: {', '.join(method_names())}",
        f"{at} max_local_epochs: expected a positive integer",
        f"{at} max_rounds: expected a positive integer",
        f"{at} codecs: unknown 'fp8'; known: fp32, fp16, int8",
        f"{at} max_upload_bytes: expected a positive integer",
        f"{at} apps: 'not a reference' is not a module:attribute",
        f"{at} require_secure_aggregation: expected true or false",
        f"{at} require_dp: expected true or false",
        f"{at} approved_runs_only: expected true or false",
        f"{at} approvals: {tmp_path / 'gone'}: no such folder",
        f"{at} colour: unknown setting",
    ]
    for problem in expected:
        assert problem in err.value.problems
    assert len(err.value.problems) == len(expected)


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("methods = 'lora'", "methods: expected a list of strings"),
        ("codecs = [1]", "codecs: expected a list of strings"),
        ("coordinator_keys = []", "coordinator_keys: needs at least one key"),
        ("max_upload_bytes = true", "max_upload_bytes: expected a positive integer"),
    ],
)
def test_wrong_types_are_named(tmp_path: Path, line: str, problem: str) -> None:
    toml = _site(tmp_path, f"[policy]\n{line}\n")
    with pytest.raises(ConfigError) as err:
        load_site_config(toml)
    assert err.value.problems == [f"{toml}: [policy] {problem}"]


def test_a_policy_that_is_not_a_table_is_named(tmp_path: Path) -> None:
    toml = _site(tmp_path)
    toml.write_text('policy = "open"\n' + toml.read_text())
    with pytest.raises(ConfigError, match=r"\[policy\] must be a table"):
        load_site_config(toml)


def test_an_empty_methods_list_allows_nothing(tmp_path: Path) -> None:
    policy = load_site_config(_site(tmp_path, "[policy]\nmethods = []\n")).policy
    with pytest.raises(PolicyRefusal, match=r"method 'lora' is not allowed .*\(allowed: none\)"):
        check_task(policy, _task(), {}, {KEY})


# -- check_task --------------------------------------------------------------------------------

KEY = "SHA256:coordinator"
HASH = "ab" * 32


def _task(**changes: object) -> TaskFacts:
    facts = TaskFacts(
        method="lora",
        local_epochs=1,
        rounds=3,
        round=1,
        codec="fp32",
        upload_bytes=100_000,
        config_hash=HASH,
        model_fingerprint="sha256:model",
        coordinator_key=KEY,
    )
    return dataclasses.replace(facts, **changes)  # type: ignore[arg-type]


POLICY = SitePolicy(coordinator_keys=(Path("c.pub"),))


def _manifest(**changes: object) -> RunManifest:
    m = RunManifest(
        method="lora",
        model_fingerprint="sha256:model",
        config_sha256=HASH,
        rounds=3,
        local_epochs=1,
        codec="fp32",
        tensors=(("classifier.weight", (2, 384)), ("classifier.bias", (2,))),
        upload_bytes=200_000,
    )
    return dataclasses.replace(m, **changes)  # type: ignore[arg-type]


def test_a_task_within_every_rule_is_accepted() -> None:
    check_task(POLICY, _task(), {}, {KEY})
    check_task(POLICY, _task(local_epochs=5, rounds=100, round=100), {}, {KEY})
    # A secure run's closing evaluation (no training) comes one round past the last.
    check_task(POLICY, _task(rounds=100, round=101, trains=False), {}, {KEY})
    with pytest.raises(PolicyRefusal, match="round 101 above"):
        check_task(POLICY, _task(rounds=100, round=101), {}, {KEY})
    check_task(POLICY, _task(upload_bytes=POLICY.max_upload_bytes), {}, {KEY})
    check_task(dataclasses.replace(POLICY, max_full_layers=1), _task(full_layers=1), {}, {KEY})
    required = dataclasses.replace(POLICY, require_secure_aggregation=True, require_dp=True)
    check_task(required, _task(secure_aggregation=True, dp=True), {}, {KEY})


@pytest.mark.parametrize(
    ("policy", "task", "reason"),
    [
        (
            POLICY,
            _task(coordinator_key="SHA256:other"),
            "policy: coordinator key SHA256:other is not trusted at this site",
        ),
        (
            POLICY,
            _task(full_layers=1),
            "policy: 1 encoder layer(s) trained whole (method.lora.full_layers), above the "
            "site's maximum of 0 (max_full_layers)",
        ),
        (
            POLICY,
            _task(method="full"),
            "policy: method 'full' is not allowed at this site (allowed: "
            + ", ".join(default_methods())
            + ")",
        ),
        (
            dataclasses.replace(POLICY, codecs=("int8",)),
            _task(),
            "policy: codec 'fp32' is not allowed at this site (allowed: int8)",
        ),
        (POLICY, _task(local_epochs=8), "policy: 8 local epochs above the site's maximum of 5"),
        (POLICY, _task(rounds=150), "policy: 150 rounds above the site's maximum of 100"),
        (
            dataclasses.replace(POLICY, max_rounds=200),
            _task(rounds=150, round=201),
            "policy: round 201 above the site's maximum of 200 rounds",
        ),
        (  # the closing evaluation of a secure run is one round past its last: no further
            dataclasses.replace(POLICY, max_rounds=200),
            _task(rounds=200, round=202, trains=False),
            "policy: round 202 above the site's maximum of 200 rounds",
        ),
        (
            POLICY,
            _task(upload_bytes=9_437_184),
            "policy: upload of 9,437,184 bytes above the site's maximum of 8,388,608",
        ),
        (
            dataclasses.replace(POLICY, require_secure_aggregation=True),
            _task(),
            "policy: secure aggregation required, the run does not use it",
        ),
        (
            dataclasses.replace(POLICY, require_dp=True),
            _task(secure_aggregation=True),
            "policy: differential privacy required, the run does not use it",
        ),
        (
            dataclasses.replace(POLICY, approved_runs_only=True),
            _task(),
            "policy: run not approved (config sha256 abababababab…)",
        ),
    ],
)
def test_each_rule_refuses_naming_the_rule_and_values(
    policy: SitePolicy, task: TaskFacts, reason: str
) -> None:
    with pytest.raises(PolicyRefusal) as err:
        check_task(policy, task, {}, {KEY})
    assert err.value.reason == reason == str(err.value)


def test_an_approved_run_trains_and_must_match_its_manifest() -> None:
    only = dataclasses.replace(POLICY, approved_runs_only=True)
    approvals = {HASH: _manifest()}
    check_task(only, _task(), approvals, {KEY})
    with pytest.raises(PolicyRefusal, match="run approved for base model sha256:model, this one"):
        check_task(only, _task(model_fingerprint="sha256:other-model"), approvals, {KEY})
    with pytest.raises(PolicyRefusal, match="upload of 300,000 bytes above the approved 200,000"):
        check_task(only, _task(upload_bytes=300_000), approvals, {KEY})
    # Without approved_runs_only the approvals are not consulted.
    check_task(POLICY, _task(config_hash="cd" * 32), approvals, {KEY})


def test_the_sealed_upload_is_checked_again_before_it_leaves() -> None:
    small = dataclasses.replace(POLICY, max_upload_bytes=10)
    check_upload(small, b"x" * 10)
    with pytest.raises(PolicyRefusal, match="upload of 11 bytes above the site's maximum of 10"):
        check_upload(small, b"x" * 11)


def test_coordinator_keys_are_read_by_fingerprint(tmp_path: Path) -> None:
    key = crypto.new_identity().public_key()
    (tmp_path / "c.pub").write_text(crypto.public_openssh(key) + " coordinator\n")
    (tmp_path / "bad.pub").write_text("x")
    policy = SitePolicy(coordinator_keys=(tmp_path / "c.pub",))
    assert list(read_coordinator_keys(policy)) == [crypto.fingerprint(key)]
    with pytest.raises(Exception, match=r"bad\.pub: not an OpenSSH public key"):
        read_coordinator_keys(SitePolicy(coordinator_keys=(tmp_path / "bad.pub",)))


# -- what a site computes before training --------------------------------------------------------


@pytest.mark.parametrize("codec", CODECS)
def test_the_upload_bound_is_the_sealed_size_within_a_few_bytes(codec: str) -> None:
    rng = np.random.default_rng(0)
    state = {
        "base.encoder.layer.0.attention.self.query.lora_A.default.weight": (8, 384),
        "base.encoder.layer.0.attention.self.query.lora_B.default.weight": (384, 8),
        "classifier.weight": (2, 384),
        "classifier.bias": (2,),
        "prompt": (20, 384),
    }
    delta = {k: rng.normal(size=s).astype(np.float32) for k, s in state.items()}
    token, site, fingerprint = "f" * 32, "VA-Long-Beach", "sha256:" + "0" * 64
    sealed = seal_delta(
        delta,
        run_token=token,
        round=100,
        site_id=site,
        method="lora",
        fingerprint=fingerprint,
        num_examples=123_456,
        codec=codec,
        run_public=crypto.raw_public(crypto.new_run_key()),
        identity=crypto.new_identity(),
    )
    bound = expected_upload_bytes(
        state, codec, method="lora", fingerprint=fingerprint, site_id=site, run_token=token
    )
    assert len(sealed) <= bound <= len(sealed) + 24
    # The coordinator's manifest does not know the site: its bound covers any site name.
    assert bound <= sealed_size_bound(state, codec, method="lora", fingerprint=fingerprint)


# -- approved runs --------------------------------------------------------------------------------


def test_a_manifest_reads_back_and_names_its_problems() -> None:
    m = _manifest()
    assert RunManifest.from_json(m.to_json()) == m
    assert "classifier.weight  2x384" in m.describe()
    assert "at most 200,000 bytes" in m.describe()
    values = json.loads(m.to_json())
    values.update(codec="fp8", config_sha256="xyz", rounds="3", extra=1)
    with pytest.raises(ConfigError) as err:
        RunManifest.from_dict(values, "m.json")
    assert err.value.problems == [
        "m.json: rounds: missing or of the wrong type",
        "m.json: config_sha256: expected 64 hex digits",
        "m.json: codec: expected one of fp32, fp16, int8",
        "m.json: extra: unknown field",
    ]


def test_approvals_are_appended_0600_and_read_by_config_hash(tmp_path: Path) -> None:
    path = tmp_path / "approved-runs.jsonl"
    assert read_approvals(path) == {}
    approve(path, _manifest())
    approve(path, _manifest(config_sha256="cd" * 32))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert set(read_approvals(path)) == {HASH, "cd" * 32}
    assert all(a.approved_at.endswith("Z") for a in read_approval_list(path))
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        approve(path, _manifest())
    path.write_text(path.read_text() + "{not json\n")
    with pytest.raises(ConfigError, match="line 3: not valid JSON"):
        read_approvals(path)


def _fedpeft(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedpeft", *args],
        capture_output=True,
        text=True,
        timeout=120,
        input=stdin,
    )


def test_manifest_approve_check_round_trip(tmp_path: Path) -> None:
    toml = _site(tmp_path, "[policy]\napproved_runs_only = true\n")
    policy = load_site_config(toml).policy
    manifest_file = tmp_path / "run-manifest.json"
    manifest_file.write_text(_manifest().to_json())
    task = _task()

    with pytest.raises(PolicyRefusal, match="run not approved"):
        check_task(policy, task, read_approvals(policy.approvals), {KEY})

    no = _fedpeft("site", "approve", str(manifest_file), "--config", str(toml), stdin="n\n")
    assert no.returncode == 1 and "not approved" in no.stdout
    assert not policy.approvals.exists()

    out = _fedpeft("site", "approve", str(manifest_file), "--config", str(toml), "--yes")
    assert out.returncode == 0, out.stderr
    assert "method:        lora" in out.stdout and "classifier.bias" in out.stdout
    assert f"approved run {HASH}" in out.stdout
    assert stat.S_IMODE(policy.approvals.stat().st_mode) == 0o600
    check_task(policy, task, read_approvals(policy.approvals), {KEY})
    other = dataclasses.replace(task, config_hash="ef" * 32)
    with pytest.raises(PolicyRefusal, match=r"run not approved \(config sha256 efefefefefef…\)"):
        check_task(policy, other, read_approvals(policy.approvals), {KEY})


def test_a_bad_manifest_is_refused_by_the_cli(tmp_path: Path) -> None:
    toml = _site(tmp_path)
    bad = tmp_path / "m.json"
    bad.write_text('{"format": 1}')
    out = _fedpeft("site", "approve", str(bad), "--config", str(toml), "--yes")
    assert out.returncode == 2 and "method: missing or of the wrong type" in out.stderr
    assert not (tmp_path / "approved-runs.jsonl").exists()


def test_config_hash_is_sha256_of_the_site_config_json() -> None:
    assert config_hash("{}") == "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"


def test_the_coordinator_writes_the_manifest_of_the_run_sites_will_see(tmp_path: Path) -> None:
    from fedpeft.common.config import load_config
    from fedpeft.common.methods import build_model, shared_state

    run = tmp_path / "run.toml"
    run.write_text('[federation]\nrounds = 2\ncodec = "int8"\n')
    out = _fedpeft("run", "manifest", str(run), "--out", str(tmp_path / "m.json"))
    assert out.returncode == 0, out.stderr
    manifest = RunManifest.from_json((tmp_path / "m.json").read_text())
    cfg = load_config(run)
    model = build_model(cfg.model, cfg.method, cfg.train.dropout, cfg.seed)
    shapes = {k: tuple(v.shape) for k, v in shared_state(model).items()}
    assert dict(manifest.tensors) == shapes and list(dict(manifest.tensors)) == list(shapes)
    assert (manifest.method, manifest.codec, manifest.rounds) == ("lora", "int8", 2)
    # What the sites receive, signed: every global state they open names this hash.
    assert manifest.config_sha256 == config_hash(cfg.for_sites().to_json())
    assert manifest.config_sha256 == cfg.for_sites().config_hash()
    assert manifest.model_fingerprint
    assert 0 < manifest.upload_bytes <= SitePolicy(coordinator_keys=()).max_upload_bytes
