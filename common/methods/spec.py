"""What a fine-tuning method is to fedpeft: one :class:`MethodSpec`, registered once by name.

A spec holds everything the rest of the code knows about a method: its own settings (the
``[method.NAME]`` table of the run config) and their checks, how it wraps the base model, the
learning rate it trains with by default, what it shares, and how an export writes it. Config,
export, the CLI and the benchmarks read the registry; none of them lists methods.

No torch here: the run config and the CLI read the registry and stay light.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from fedpeft.common.errors import ConfigError

if TYPE_CHECKING:
    import torch

#: A method's settings: its frozen config dataclass, or ``None`` for a method without settings.
S = TypeVar("S")


class ExportFormat(enum.StrEnum):
    """How ``fedpeft export`` writes a method's global state."""

    #: peft's own ``adapter_config.json`` + ``adapter_model.safetensors``
    #: (``peft.PeftModel.from_pretrained`` loads it).
    PEFT = "peft"
    #: ``fedpeft_state.safetensors``: the shared parameters by name (``load_export`` loads it).
    STATE = "state"


def no_problems(settings: Any) -> list[str]:
    """The check of a method whose every setting value is valid (or that has none)."""
    return []


def failed(*rules: tuple[bool, str]) -> list[str]:
    """The messages of the ``(ok, message)`` rules that do not hold, in order."""
    return [message for ok, message in rules if not ok]


@dataclass(frozen=True)
class MethodSpec(Generic[S]):
    """One fine-tuning method. The classification head always trains and travels with it."""

    #: The ``method.name`` that selects it, and the name of its ``[method.NAME]`` table.
    name: str
    #: What trains and is shared besides the head, in one line (CLI help, docs).
    shares: str
    #: ``build(settings, base)``: wraps the base model so that exactly the shared parameters
    #: require grad. Imports torch / peft itself, when called.
    build: Callable[[S, torch.nn.Module], torch.nn.Module]
    #: The AdamW learning rate when ``train.lr`` is 0 (resolved into the stored config).
    default_lr: float
    export: ExportFormat
    #: Its settings' frozen dataclass (a field of ``MethodConfig`` named :attr:`name`), or None.
    config: type[S] | None = None
    #: The problems of a settings table, each ``"method.NAME.FIELD: what is wrong"``.
    check: Callable[[S], list[str]] = no_problems
    #: For :attr:`ExportFormat.PEFT`: what a model loaded by ``peft.PeftModel.from_pretrained``
    #: still needs before it predicts like the trained one (None: nothing).
    after_peft_load: Callable[[torch.nn.Module], torch.nn.Module] | None = None


_REGISTRY: dict[str, MethodSpec[Any]] = {}


def register(spec: MethodSpec[S]) -> MethodSpec[S]:
    """Add ``spec`` to the registry; a second spec with the same name is refused."""
    if spec.name in _REGISTRY:
        raise ValueError(f"PEFT method {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def specs() -> tuple[MethodSpec[Any], ...]:
    """Every registered method, in the order they were registered (the order the CLI lists)."""
    return tuple(_REGISTRY.values())


def method_names() -> list[str]:
    """The registered methods' names, in registration order."""
    return list(_REGISTRY)


def get_spec(name: str) -> MethodSpec[Any]:
    """The spec registered as ``name``; :class:`ConfigError` for a name nobody registered."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"method.name: unknown method {name!r}; known: {', '.join(sorted(_REGISTRY))}"
        ) from None
