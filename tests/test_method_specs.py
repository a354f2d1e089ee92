"""The method registry: one spec per method, and config, export, CLI and bench read only it."""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
import re
import runpy
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import fedpeft.common.methods as methods
from fedpeft.cli import export_description, method_help
from fedpeft.common.config import MethodConfig, load_config
from fedpeft.common.errors import ConfigError
from fedpeft.common.methods import (
    BUILTIN,
    ExportFormat,
    MethodSpec,
    enable_prefix_tuning,
    get_spec,
    method_names,
    register,
    specs,
)


def _names(listing: str) -> list[str]:
    """``a, b (default) or c`` -> ``[a, b, c]``."""
    return [n.removesuffix(" (default)") for n in re.split(r", | and | or ", listing)]


def test_the_registry_refuses_a_second_method_of_the_same_name() -> None:
    before = specs()
    with pytest.raises(ValueError, match="'lora' is already registered"):
        register(get_spec("lora"))
    other = MethodSpec(
        name="lora",
        shares="x",
        build=lambda s, base: base,
        default_lr=1.0,
        export=ExportFormat.STATE,
    )
    with pytest.raises(ValueError, match="'lora' is already registered"):
        register(other)
    assert specs() == before and get_spec("lora") is not other


def test_an_unknown_name_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown method 'nope'; known: adapter, bitfit, "):
        get_spec("nope")


def test_every_method_module_is_registered_in_order() -> None:
    """A module that defines a SPEC but is missing from BUILTIN would never be registered."""
    defined = set()
    for info in pkgutil.iter_modules(methods.__path__):
        module = importlib.import_module(f"{methods.__name__}.{info.name}")
        if isinstance(getattr(module, "SPEC", None), MethodSpec):
            defined.add(module.SPEC)
            assert module.SPEC.name == info.name  # one module per method, named after it
    assert set(BUILTIN) == defined
    assert specs() == BUILTIN
    # The order of the CLI help and the benchmark tables (a new method may come anywhere).
    shipped = ["lora", "prefix", "prompt", "ia3", "adapter", "bitfit", "full"]
    assert [name for name in method_names() if name in shipped] == shipped


def test_method_config_has_exactly_one_table_per_method_with_settings() -> None:
    tables = {
        f.name: f
        for f in dataclasses.fields(MethodConfig)
        if f.name not in ("name", "compose", "mlm")
    }
    configured = {s.name: s.config for s in specs() if s.config is not None}
    assert set(tables) == set(configured)
    defaults = MethodConfig()
    for name, config in configured.items():
        assert isinstance(getattr(defaults, name), config)
        assert getattr(defaults, name) == config()


@pytest.mark.parametrize("spec", BUILTIN, ids=lambda s: s.name)
def test_each_spec_accepts_its_defaults(spec: MethodSpec) -> None:  # type: ignore[type-arg]
    assert spec.check(spec.config() if spec.config is not None else None) == []


#: A wrong value for every setting of the shipped methods' tables.
WRONG = {
    "lora": {"r": 0, "alpha": 0, "dropout": 1.0, "target_modules": [], "full_layers": -1},
    "prefix": {"num_virtual_tokens": 0},
    "prompt": {"num_virtual_tokens": 0, "init": "words", "init_text": " "},
    "adapter": {"bottleneck": 0, "placement": ["attention", "everywhere"]},
}


@pytest.mark.parametrize("name", WRONG)
def test_the_config_reports_each_specs_problems(name: str) -> None:
    spec = get_spec(name)
    assert spec.config is not None
    assert set(WRONG[name]) == {f.name for f in dataclasses.fields(spec.config)}
    for setting, wrong in WRONG[name].items():
        value = tuple(wrong) if isinstance(wrong, list) else wrong
        problems = spec.check(dataclasses.replace(spec.config(), **{setting: value}))
        assert problems and all(p.startswith(f"method.{name}.") for p in problems), setting
        with pytest.raises(ConfigError) as info:
            load_config(overrides={f"method.{name}.{setting}": wrong})
        assert info.value.problems == problems


def test_every_default_rate_is_the_rate_the_config_resolves() -> None:
    for spec in specs():
        assert load_config(overrides={"method.name": spec.name}).train.lr == spec.default_lr


def test_the_cli_help_lists_exactly_the_registry() -> None:
    text = method_help()
    listed = re.search(r"fine-tuning method: (.*?); its own settings", text)
    assert listed is not None
    assert _names(listed.group(1)) == method_names()
    assert f"{MethodConfig().name} (default)" in listed.group(1)
    assert text.count("(default)") == 1
    for spec in specs():
        assert f"{spec.name}: {spec.shares}" in text


def test_export_formats_come_from_the_registry() -> None:
    text = export_description()
    peft = re.search(r"for (.*?) a peft adapter", text)
    state = re.search(r"for ([^:;]*?) a safetensors file", text)
    assert peft is not None and state is not None
    assert _names(peft.group(1)) == [s.name for s in specs() if s.export is ExportFormat.PEFT]
    assert _names(state.group(1)) == [s.name for s in specs() if s.export is ExportFormat.STATE]
    assert sorted(_names(peft.group(1)) + _names(state.group(1))) == sorted(method_names())
    # Only a peft export is loaded by peft; prefix then needs its fix-up (README shows it).
    for spec in specs():
        assert spec.after_peft_load is None or spec.export is ExportFormat.PEFT
    assert get_spec("prefix").after_peft_load is enable_prefix_tuning


def test_the_benchmark_runs_every_method_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    script = Path(__file__).parents[1] / "bench" / "methods.py"
    db = f"sqlite:///{tmp_path / 'bench.db'}"
    monkeypatch.setattr(sys, "argv", [str(script), "--report-only", "--seeds", "0", "--db", db])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(script), run_name="__main__")
    assert done.value.code == 0
    # The summary table has a row per method, "| NAME | – | ... | 0 |" when it has no runs yet.
    out = capsys.readouterr().out
    assert re.findall(r"^\| (\S+) \| – .*\| 0 \|$", out, flags=re.M) == method_names()


def test_reading_the_registry_imports_no_torch() -> None:
    """The run config and the CLI read the registry: they must not pay for torch and peft."""
    code = (
        "import sys, fedpeft.cli, fedpeft.common.config, fedpeft.common.methods; "
        "print(sorted(m for m in ('torch', 'peft', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_methods_package_is_installed() -> None:
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert "fedpeft.common.methods" in pyproject["tool"]["setuptools"]["packages"]
