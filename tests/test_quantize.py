"""A quantized frozen base at the site (common/quantize.py): the base's linear layers and word
embeddings held in int8, every method but ``full`` training on it with what it shares
unchanged."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from test_client import RUN_KEY, SITE_KEY, _message, _setup, _site_file, _site_setup, _state
from test_client import task_identity as task_identity  # the autouse fixture, here too

from fedpeft.client.app import handle
from fedpeft.client.setup import read_setup_file
from fedpeft.common import keys
from fedpeft.common.config import RunConfig, build_config, load_config
from fedpeft.common.envelope import Expected, open_delta
from fedpeft.common.errors import ConfigError, ModelError
from fedpeft.common.methods import build_method, shared_state
from fedpeft.common.model import load_base_model, model_fingerprint, resolve_model_path
from fedpeft.common.quantize import Int8Embedding, Int8Linear, quantize_base, weight_bytes
from fedpeft.common.records import from_blob_record

IDS = torch.tensor(
    [[101, 2023, 2003, 1037, 3231, 2005, 2009, 102], [101, 7592, 2088, 2003, 2307, 1010, 2017, 102]]
)
MASK = torch.ones_like(IDS)


@pytest.fixture(scope="module")
def bases() -> tuple[torch.nn.Module, torch.nn.Module]:
    base = load_base_model(load_config().model, 0.0, 0).eval()
    return base, quantize_base(copy.deepcopy(base)).eval()


def test_the_base_is_held_in_int8_but_the_head(
    bases: tuple[torch.nn.Module, torch.nn.Module],
) -> None:
    base, q = bases
    linears = [m for n, m in q.named_modules() if isinstance(m, torch.nn.Linear)]
    assert sum(isinstance(m, Int8Linear) for m in linears) == 6 * 6 + 1  # 6 layers, pooler
    assert type(q.classifier) is torch.nn.Linear and q.classifier.weight.dtype == torch.float32
    assert isinstance(q.get_input_embeddings(), Int8Embedding)
    assert all(m.weight.dtype == torch.int8 for m in linears if isinstance(m, Int8Linear))
    assert weight_bytes(q) < 0.3 * weight_bytes(base)
    with torch.no_grad():
        a = base(input_ids=IDS, attention_mask=MASK, output_hidden_states=True).hidden_states[-1]
        b = q(input_ids=IDS, attention_mask=MASK, output_hidden_states=True).hidden_states[-1]
    # Weight-only int8 moves the last hidden state by a few per cent (3.8 % here), not more.
    assert float((a - b).norm() / a.norm()) < 0.1
    assert float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)) > 0.99


@pytest.fixture(scope="module")
def nf4(bases: tuple[torch.nn.Module, torch.nn.Module]) -> torch.nn.Module:
    return quantize_base(copy.deepcopy(bases[0]), "nf4").eval()


def test_an_nf4_base_holds_its_linear_layers_in_four_bits(
    bases: tuple[torch.nn.Module, torch.nn.Module], nf4: torch.nn.Module
) -> None:
    import bitsandbytes as bnb

    base, _ = bases
    layers = [m for m in nf4.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 6 * 6 + 1 and all(m.weight.quant_type == "nf4" for m in layers)
    assert all(m.weight.dtype == torch.uint8 for m in layers)  # two 4-bit values a byte
    assert type(nf4.classifier) is torch.nn.Linear
    assert isinstance(nf4.get_input_embeddings(), Int8Embedding)
    assert weight_bytes(nf4) < 0.21 * weight_bytes(base)
    with torch.no_grad():
        a = base(input_ids=IDS, attention_mask=MASK, output_hidden_states=True).hidden_states[-1]
        b = nf4(input_ids=IDS, attention_mask=MASK, output_hidden_states=True).hidden_states[-1]
    # Four bits move MiniLM's last hidden state by 28 % (relative norm): much more than int8.
    assert float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)) > 0.9
    with pytest.raises(ModelError, match="quantize 'int4' is not one of int8, nf4"):
        quantize_base(copy.deepcopy(base), "int4")


@pytest.mark.parametrize("kind", ["int8", "nf4"])
@pytest.mark.parametrize("method", ["lora", "prefix", "prompt", "ia3", "adapter", "bitfit"])
def test_every_method_trains_on_a_quantized_base_and_shares_the_same_state(
    bases: tuple[torch.nn.Module, torch.nn.Module], nf4: torch.nn.Module, method: str, kind: str
) -> None:
    base, q = bases
    cfg = replace(load_config().method, name=method)
    model = build_method(cfg, copy.deepcopy(q if kind == "int8" else nf4))
    reference = shared_state(build_method(cfg, copy.deepcopy(base)))
    before = shared_state(model)
    assert {k: v.shape for k, v in before.items()} == {k: v.shape for k, v in reference.items()}
    held = (torch.int8, torch.uint8)  # int8, and nf4's packed pairs
    frozen = {n: p.clone() for n, p in model.named_parameters() if p.dtype in held}
    assert frozen and not any(p.requires_grad for n, p in model.named_parameters() if n in frozen)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    with torch.no_grad():  # an evaluation first, as early stopping makes between epochs
        model.eval()(input_ids=IDS, attention_mask=MASK)
    model.train()
    for _ in range(2):  # the second step reaches what a zero-initialized part gates at first
        loss = model(input_ids=IDS, attention_mask=MASK, labels=torch.tensor([1, 0])).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = shared_state(model)
    moved = [k for k in after if not torch.equal(after[k], before[k])]
    assert len(moved) == len(after)  # every shared tensor trained, the head and the method's
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name])  # the quantized base never changes


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_a_site_with_a_quantized_base_sends_the_runs_delta(
    tmp_path: Path, cfg: RunConfig, kind: str
) -> None:
    fp = model_fingerprint(resolve_model_path(cfg.model))
    setup = replace(_setup(_site_file(tmp_path)), quantize=kind)
    reply = handle(_message(cfg, fp), setup)
    assert reply.content[keys.CONFIG][keys.STATUS] == "ok"
    shapes = {k: v.shape for k, v in _state(cfg).items()}
    sealed = from_blob_record(reply.content[keys.SEALED])
    expected = Expected("run-token", 1, "lora", fp, shapes, 1 << 22)
    delta = open_delta(sealed, expected, RUN_KEY, {"site-x": SITE_KEY.public_key()}).delta
    assert sum(v.size for v in delta.values()) == 74_498
    assert any(abs(v).max() > 0 for v in delta.values())
    # The site trained on its int8 copy of the base (the session's, built from its setup).
    from fedpeft.client.app import site_session

    base = site_session(cfg.for_sites(), setup).base
    layer = Int8Linear if kind == "int8" else __import__("bitsandbytes").nn.Linear4bit
    assert sum(isinstance(m, layer) for m in base.modules()) == 37
    # A method that trains the base weights is refused, with the reason, before any training.
    full = load_config(overrides={"data.dataset": str(tmp_path), "method.name": "full"})
    refused = handle(_message(full, fp), setup)
    assert refused.content[keys.CONFIG][keys.STATUS] == "refused"
    assert "trains base weights" in refused.content[keys.CONFIG][keys.ERROR]


def test_quantize_is_the_sites_setting(tmp_path: Path) -> None:
    def setup(folder: str, table: str = "") -> str:
        (tmp_path / folder).mkdir()
        return _site_setup(_site_file(tmp_path / folder), table)

    assert read_setup_file(Path(setup("default"))).quantize == "none"
    assert read_setup_file(Path(setup("int8", 'quantize = "int8"\n'))).quantize == "int8"
    assert read_setup_file(Path(setup("nf4", 'quantize = "nf4"\n'))).quantize == "nf4"
    with pytest.raises(ConfigError, match=r"\[site\] quantize: expected one of none, int8, nf4"):
        setup("int4", 'quantize = "int4"\n')
    assert build_config({"site_quantize": ["int8", "none"]}).site_quantize == ("int8", "none")
    with pytest.raises(ConfigError, match="site_quantize: each must be one of none, int8, nf4"):
        build_config({"site_quantize": ["int4"]})
    with pytest.raises(ConfigError, match="method 'full' trains base weights"):
        build_config({"site_quantize": ["none", "nf4"], "method": {"name": "full"}})
    # LoRA with fully trained top layers trains base weights too.
    with pytest.raises(ConfigError, match="method 'lora' trains base weights"):
        build_config({"site_quantize": ["int8"], "method": {"lora": {"full_layers": 1}}})


def test_simulate_tells_each_virtual_site_its_own_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``site_quantize`` and ``site_lora_ranks`` reach virtual site i as its own setup."""
    from test_client import COORDINATOR

    from fedpeft.client.setup import setup_for_partition, simulation_sites_env
    from fedpeft.common import crypto
    from fedpeft.common.environment import SIMULATION_KEYS_ENV, SIMULATION_SITES_ENV

    for i in range(2):
        crypto.write_private_key(tmp_path / f"partition-{i}.key", SITE_KEY)
    (tmp_path / "coordinator.pub").write_text(crypto.public_openssh(COORDINATOR.public_key()))
    cfg = build_config({"site_quantize": ["int8"], "site_lora_ranks": [0, 2]})
    env = simulation_sites_env(cfg.data, "cpu", cfg.site_lora_ranks, cfg.site_quantize)
    monkeypatch.setenv(SIMULATION_KEYS_ENV, str(tmp_path))
    monkeypatch.setenv(SIMULATION_SITES_ENV, env)
    first, second = setup_for_partition(0), setup_for_partition(1)
    assert (first.quantize, first.lora_rank) == ("int8", 0)
    assert (second.quantize, second.lora_rank) == ("none", 2)
