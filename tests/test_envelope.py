"""Sealed deltas and signed global states: published vectors through our wrappers, codecs, every
rejection, and random / mutated envelopes."""

from __future__ import annotations

import hashlib
import os
import re
import stat
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedpeft.common import crypto
from fedpeft.common._proto.fedpeft.v1 import envelope_pb2 as pb
from fedpeft.common.config import load_config
from fedpeft.common.envelope import (
    Expected,
    ForgedGlobalState,
    OpenedEvaluation,
    open_delta,
    open_evaluation,
    open_global,
    seal_delta,
    seal_evaluation,
    sign_global,
)
from fedpeft.common.errors import DeltaRejected, KeyFileError
from fedpeft.common.wire import CODECS, decode, encode

#: The settings sites act on, as the coordinator signs them with every global state.
SITE_CONFIG = load_config().for_sites()

# -- published test vectors, through our wrappers --------------------------------------------------


def test_x25519_rfc7748_section_6_1() -> None:
    alice = x25519.X25519PrivateKey.from_private_bytes(
        bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    )
    bob_public = bytes.fromhex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
    assert crypto.raw_public(alice) == bytes.fromhex(
        "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
    )
    assert crypto.x25519_shared(alice, bob_public) == bytes.fromhex(
        "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"
    )
    assert crypto.x25519_shared(alice, bytes(32)) is None  # low-order point refused


def test_aes_256_gcm_mcgrew_viega_test_cases_13_and_14() -> None:
    key, nonce = bytes(32), bytes(12)
    assert crypto.aes_gcm_encrypt(key, nonce, b"", b"") == bytes.fromhex(
        "530f8afbc74536b9a963b4f1c4cb738b"
    )
    sealed = crypto.aes_gcm_encrypt(key, nonce, bytes(16), b"")
    assert sealed == bytes.fromhex(
        "cea7403d4d606b6e074ec5d3baf39d18" + "d0d1c8a799996bf0265b98b5d48ab919"
    )
    assert crypto.aes_gcm_decrypt(key, nonce, sealed, b"") == bytes(16)
    assert crypto.aes_gcm_decrypt(key, nonce, sealed, b"other aad") is None


def test_hkdf_sha256_rfc5869_test_case_1() -> None:
    okm = crypto.hkdf_sha256(bytes([0x0B] * 22), bytes(range(13)), bytes(range(0xF0, 0xFA)), 42)
    assert okm == bytes.fromhex(
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    )


def test_ecdsa_p384_sha256_rfc6979_a26_sample() -> None:
    """RFC 6979 A.2.6: P-384 key, SHA-256, message "sample" (our scheme: ECDSA P-384 over a
    SHA-256 digest)."""
    d = int(
        "6B9D3DAD2E1B8C1C05B19875B6659F4DE23C3B667BF297BA9AA47740787137D8"
        "96D5724E4C70A825F872C9EA60D2EDF5",
        16,
    )
    ux = int(
        "EC3A4E415B4E19A4568618029F427FA5DA9A8BC4AE92E02E06AAE5286B300C64"
        "DEF8F0EA9055866064A254515480BC13",
        16,
    )
    r = int(
        "21B13D1E013C7FA1392D03C5F99AF8B30C570C6F98D4EA8E354B63A21D3DAA33"
        "BDE1E888E63355D92FA2B3C36D8FB2CD",
        16,
    )
    s = int(
        "F3AA443FB107745BF4BD77CB3891674632068A10CA67E3D45DB2266FA7D1FEEB"
        "EFDC63ECCD1AC42EC0CB8668A4FA0AB0",
        16,
    )
    public = ec.derive_private_key(d, ec.SECP384R1()).public_key()
    assert public.public_numbers().x == ux
    signature = encode_dss_signature(r, s)
    assert crypto.ecdsa_verify_digest(public, signature, hashlib.sha256(b"sample").digest())
    assert not crypto.ecdsa_verify_digest(public, signature, hashlib.sha256(b"samplf").digest())


def test_signatures_are_bound_to_their_purpose() -> None:
    key = crypto.new_identity()
    sig = crypto.sign(key, crypto.DOMAIN_DELTA, b"a", b"bc")
    assert crypto.verify(key.public_key(), sig, crypto.DOMAIN_DELTA, b"a", b"bc")
    assert not crypto.verify(key.public_key(), sig, crypto.DOMAIN_GLOBAL, b"a", b"bc")
    assert not crypto.verify(key.public_key(), sig, crypto.DOMAIN_DELTA, b"ab", b"c")


# -- key files -------------------------------------------------------------------------------------


def test_identity_key_files(tmp_path: Path) -> None:
    key = crypto.new_identity()
    path = tmp_path / "site.key"
    crypto.write_private_key(path, key)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    again = crypto.read_private_key(path)
    line = crypto.public_openssh(again.public_key())
    assert line.startswith("ecdsa-sha2-nistp384 ")
    assert crypto.parse_public_key(line + " site-a").public_numbers() == (
        key.public_key().public_numbers()
    )
    assert crypto.fingerprint(key.public_key()).startswith("SHA256:")
    with pytest.raises(FileExistsError):
        crypto.write_private_key(path, key)  # never overwritten
    os.chmod(path, 0o644)
    with pytest.raises(KeyFileError, match="readable by others"):
        crypto.read_private_key(path)
    with pytest.raises(KeyFileError, match="cannot read"):
        crypto.read_private_key(tmp_path / "absent.key")
    with pytest.raises(KeyFileError, match="not an OpenSSH public key"):
        crypto.parse_public_key("ssh-rsa nonsense")


# -- codecs ----------------------------------------------------------------------------------------


def _state(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "layer.lora_A": rng.normal(0, 0.02, (8, 384)).astype(np.float32),
        "layer.lora_B": rng.normal(0, 0.5, (384, 8)).astype(np.float32),
        "classifier.bias": rng.normal(0, 1, (2,)).astype(np.float32),
        "zeros": np.zeros((3, 4), np.float32),
    }


@pytest.mark.parametrize("codec", list(CODECS))
def test_codec_round_trips(codec: str) -> None:
    state = _state()
    shapes = {k: v.shape for k, v in state.items()}
    back = decode(encode(state, codec), shapes, codec)
    assert list(back) == list(state)
    for name, value in state.items():
        assert back[name].dtype == np.float32 and back[name].shape == value.shape
        if codec == "fp32":
            assert np.array_equal(back[name], value)
        elif codec == "fp16":
            assert np.allclose(back[name], value, rtol=1e-3, atol=1e-7)
        else:  # int8: within half a step of each row's scale (rows of >= 64 values)
            per_row = value.ndim >= 2 and value[0].size >= 64
            rows = value.reshape(value.shape[0] if per_row else 1, -1)
            step = np.abs(rows).max(axis=1, keepdims=True) / 127
            err = np.abs(back[name].reshape(rows.shape) - rows)
            assert (err <= step / 2 + 1e-7).all()
    assert np.array_equal(back["zeros"], state["zeros"])


# -- sealing and opening ---------------------------------------------------------------------------


class World:
    def __init__(self) -> None:
        self.run_key = crypto.new_run_key()
        self.sites = {"a": crypto.new_identity(), "b": crypto.new_identity()}
        self.state = _state()
        self.expected = Expected(
            run_token="run-1",
            round=3,
            method="lora",
            fingerprint="sha256:base",
            shapes={k: v.shape for k, v in self.state.items()},
            max_bytes=1 << 20,
        )

    def seal(self, site: str = "a", signer: str | None = None, **changes: object) -> bytes:
        args: dict[str, object] = dict(
            run_token="run-1",
            round=3,
            site_id=site,
            method="lora",
            fingerprint="sha256:base",
            num_examples=40,
            codec="fp32",
            run_public=crypto.raw_public(self.run_key),
            identity=self.sites[signer or site],
        )
        args.update(changes)
        delta = args.pop("delta", self.state)
        return seal_delta(delta, **args)  # type: ignore[arg-type]

    def open(self, data: bytes, expected: Expected | None = None) -> object:
        public = {name: key.public_key() for name, key in self.sites.items()}
        return open_delta(data, expected or self.expected, self.run_key, public)


@pytest.fixture(scope="module")
def world() -> World:
    return World()


def _reason(world: World, data: bytes, expected: Expected | None = None) -> str:
    with pytest.raises(DeltaRejected) as info:
        world.open(data, expected)
    return info.value.reason


def test_a_sealed_delta_opens_to_the_same_tensors(world: World) -> None:
    opened = world.open(world.seal())
    assert opened.site_id == "a" and opened.num_examples == 40  # type: ignore[attr-defined]
    for name, value in world.state.items():
        assert np.array_equal(opened.delta[name], value)  # type: ignore[attr-defined]


def test_the_plaintext_is_nowhere_in_the_envelope(world: World) -> None:
    data = world.seal()
    for value in world.state.values():
        if value.any():
            assert value.tobytes()[:32] not in data


def test_each_rejection_has_its_reason(world: World) -> None:
    w = world
    other_run_key = crypto.new_run_key()
    stranger = crypto.new_identity()
    assert _reason(w, w.seal(), replace(w.expected, max_bytes=100)) == "too-large"
    assert _reason(w, b"\xff\xff not a proto") == "malformed"
    assert _reason(w, w.seal()[:-7]) == "malformed"  # truncated
    w.sites["mallory"] = stranger
    sealed_by_stranger = w.seal(site="mallory")
    del w.sites["mallory"]
    assert _reason(w, sealed_by_stranger) == "unknown-site"
    assert _reason(w, w.seal(signer="b")) == "bad-signature"  # site a's claim, b's key
    assert _reason(w, w.seal(run_token="run-0")) == "wrong-run"
    assert _reason(w, w.seal(round=2)) == "wrong-round"  # a replay of the previous round
    assert _reason(w, w.seal(fingerprint="sha256:other")) == "fingerprint"
    assert _reason(w, w.seal(method="ia3")) == "method"
    assert _reason(w, w.seal(codec="fp16")) == "dtype"
    extra = {**w.state, "extra": np.zeros(2, np.float32)}
    assert _reason(w, w.seal(delta=extra)) == "names"
    wrong_shape = {**w.state, "zeros": np.zeros((4, 3), np.float32)}
    assert _reason(w, w.seal(delta=wrong_shape)) == "shape"
    sealed_for_other_run = w.seal(run_public=crypto.raw_public(other_run_key))
    assert _reason(w, sealed_for_other_run) == "tampered"


def _mutate(data: bytes, field: str, flip: int) -> bytes:
    sealed = pb.SealedDelta()
    sealed.ParseFromString(data)
    value = bytearray(getattr(sealed, field))
    value[flip % len(value)] ^= 0x01
    setattr(sealed, field, bytes(value))
    return sealed.SerializeToString()


def test_tampering_with_any_part_is_caught(world: World) -> None:
    data = world.seal()
    assert _reason(world, _mutate(data, "ciphertext", 5)) == "tampered"
    assert _reason(world, _mutate(data, "nonce", 0)) == "tampered"
    assert _reason(world, _mutate(data, "ephemeral_public_key", 3)) == "tampered"
    # A signature no registered key made: the bytes are not as any site signed them.
    assert _reason(world, _mutate(data, "signature", 20)) == "tampered"
    # A header edit that keeps every field plausible (examples count) still breaks the AAD.
    sealed = pb.SealedDelta()
    sealed.ParseFromString(data)
    header = pb.DeltaHeader()
    header.ParseFromString(sealed.header)
    header.num_examples = 4000
    sealed.header = header.SerializeToString()
    assert _reason(world, sealed.SerializeToString()) == "tampered"


@pytest.mark.parametrize(
    ("forge", "reason"),
    [
        (lambda w: w.seal(signer="b"), "bad-signature"),  # a's claim, b's key
        (lambda w: w.seal(signer="stranger"), "tampered"),  # a's claim, an unregistered key
        (lambda w: _mutate(w.seal(), "ciphertext", 5), "tampered"),
        (lambda w: _mutate(w.seal(), "signature", 20), "tampered"),
    ],
    ids=["another-site", "unregistered-key", "altered-ciphertext", "altered-signature"],
)
def test_nothing_is_decrypted_before_the_signature_verifies(
    world: World, monkeypatch: pytest.MonkeyPatch, forge: object, reason: str
) -> None:
    """The AEAD (and the key agreement before it) is never reached for an envelope that the
    site it names did not sign; a genuine one still opens through the same path."""
    world.sites["stranger"] = crypto.new_identity()
    try:
        data = forge(world)  # type: ignore[operator]
    finally:
        del world.sites["stranger"]
    calls: list[str] = []
    real_unseal, real_decrypt = crypto.unseal, crypto.aes_gcm_decrypt

    def unseal(*args: object) -> bytes | None:
        calls.append("unseal")
        return real_unseal(*args)  # type: ignore[arg-type]

    def decrypt(*args: object) -> bytes | None:
        calls.append("decrypt")
        return real_decrypt(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(crypto, "unseal", unseal)
    monkeypatch.setattr(crypto, "aes_gcm_decrypt", decrypt)
    assert _reason(world, data) == reason
    assert calls == []
    world.open(world.seal())
    assert calls == ["unseal", "decrypt"]  # the spies are on the path a delta takes


@pytest.mark.parametrize("codec", list(CODECS))
def test_every_codec_seals_and_opens(world: World, codec: str) -> None:
    opened = world.open(world.seal(codec=codec), replace(world.expected, codec=codec))
    back = opened.delta  # type: ignore[attr-defined]
    assert all(np.allclose(back[k], v, atol=0.01) for k, v in world.state.items())


def test_header_bytes_match_the_wire_format_v1(world: World) -> None:
    """Fixed fields give fixed header bytes (fields by number: 2 is the run token in both
    headers); a renumbered field or a changed encoding fails here."""
    tiny = {"w": np.zeros((2, 3), np.float32)}
    sealed = pb.SealedDelta()
    sealed.ParseFromString(
        world.seal(delta=tiny, run_token="tok", site="a", fingerprint="sha256:base", codec="int8")
    )
    assert sealed.header.hex() == (
        "08011203746f6b18032201612a046c6f7261320b7368613235363a62617365380342070a0177120202034828"
    )
    signed = pb.SignedGlobalState()
    signed.ParseFromString(
        sign_global(
            tiny,
            run_token="tok",
            round=3,
            method="lora",
            fingerprint="sha256:base",
            run_public=bytes(range(32)),
            config=SITE_CONFIG,
            coordinator=crypto.new_identity(),
        )
    )
    config = SITE_CONFIG.to_json().encode()
    assert len(config) >= 128  # a two-byte length below
    assert signed.header.hex() == (
        "08011203746f6b180322046c6f72612a0b7368613235363a6261736532070a0177120202033a20"
        + bytes(range(32)).hex()
        + "42"  # field 8, length-delimited: the site config, canonical JSON
        + bytes([len(config) & 0x7F | 0x80, len(config) >> 7]).hex()
        + config.hex()
    )


def test_an_opened_delta_has_exactly_the_expected_layout(world: World) -> None:
    """server/validation.py relies on this: it no longer checks names, shapes or dtype."""
    items = list(world.state.items())
    assert _reason(world, world.seal(delta=dict(items[1:]))) == "names"  # one missing
    assert _reason(world, world.seal(delta=dict(reversed(items)))) == "names"  # out of order
    for codec in CODECS:
        opened = world.open(world.seal(codec=codec), replace(world.expected, codec=codec))
        delta = opened.delta  # type: ignore[attr-defined]
        assert list(delta) == list(world.expected.shapes)
        for name, shape in world.expected.shapes.items():
            assert delta[name].shape == tuple(shape) and delta[name].dtype == np.float32


# -- random and mutated envelopes ------------------------------------------------------------------


def _opens_or_rejects(world: World, data: bytes) -> None:
    try:
        opened = world.open(data)
    except DeltaRejected as exc:
        assert exc.reason  # a typed rejection, nothing else
        return
    # The only way to open: an intact envelope from a registered site.
    for name, value in world.state.items():
        assert np.array_equal(opened.delta[name], value)  # type: ignore[attr-defined]


@settings(max_examples=5_000, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.binary(max_size=4096))
def test_random_bytes_only_ever_reject(world: World, data: bytes) -> None:
    _opens_or_rejects(world, data)


@pytest.fixture(scope="module")
def genuine(world: World) -> bytes:
    return world.seal()


@settings(max_examples=5_000, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.lists(
        st.tuples(st.integers(min_value=0), st.integers(min_value=0, max_value=255)),
        min_size=1,
        max_size=4,
    ),
    st.integers(min_value=0),
    st.sampled_from(["flip", "truncate", "extend"]),
)
def test_mutated_envelopes_only_ever_reject(
    world: World, genuine: bytes, edits: list[tuple[int, int]], cut: int, how: str
) -> None:
    data = bytearray(genuine)
    for position, value in edits:
        data[position % len(data)] ^= value or 1
    if how == "truncate":
        data = data[: cut % len(data)]
    elif how == "extend":
        data += bytes([cut % 256]) * (cut % 64 + 1)
    _opens_or_rejects(world, bytes(data))


# -- signed global state ---------------------------------------------------------------------------


def test_global_state_is_signed_by_the_coordinator(world: World) -> None:
    coordinator = crypto.new_identity()
    run_public = crypto.raw_public(world.run_key)
    data = sign_global(
        world.state,
        run_token="run-1",
        round=3,
        method="lora",
        fingerprint="sha256:base",
        run_public=run_public,
        config=SITE_CONFIG,
        coordinator=coordinator,
    )
    got = open_global(data, coordinator.public_key())
    got_fields = (got.run_token, got.round, got.method, got.run_public)
    assert got_fields == ("run-1", 3, "lora", run_public)
    assert got.config == SITE_CONFIG
    assert got.config_hash == hashlib.sha256(SITE_CONFIG.to_json().encode()).hexdigest()
    assert all(np.array_equal(got.state[k], v) for k, v in world.state.items())
    signed = pb.SignedGlobalState()
    signed.ParseFromString(data)
    signed.payload = signed.payload[:-4] + b"\x00\x00\x80\x7f"  # a relay swaps in an Inf
    with pytest.raises(ForgedGlobalState, match="not signed by the coordinator"):
        open_global(signed.SerializeToString(), coordinator.public_key())
    with pytest.raises(ForgedGlobalState, match="not signed by the coordinator"):
        open_global(data, crypto.new_identity().public_key())
    with pytest.raises(ForgedGlobalState, match="not a signed global state"):
        open_global(b"\xff\xff", coordinator.public_key())


def _signed_with_header(edit: object) -> tuple[bytes, ec.EllipticCurvePrivateKey]:
    """A global state whose header ``edit`` changed before the coordinator signed it."""
    coordinator = crypto.new_identity()
    header = pb.GlobalStateHeader(
        schema_version=1, run_token="t", round=1, method="lora", run_public_key=bytes(32)
    )
    header.site_config_json = SITE_CONFIG.to_json()
    edit(header)  # type: ignore[operator]
    raw = header.SerializeToString()
    signature = crypto.sign(coordinator, crypto.DOMAIN_GLOBAL, raw, b"")
    data = pb.SignedGlobalState(header=raw, payload=b"", signature=signature)
    return data.SerializeToString(), coordinator


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda h: setattr(h, "site_config_json", ""), "site config is not valid"),
        (
            lambda h: setattr(
                h, "site_config_json", re.sub(r'"rounds":\d+,', "", h.site_config_json)
            ),
            "rounds: missing",
        ),
        (
            lambda h: setattr(h, "site_config_json", h.site_config_json.replace(":", ": ", 1)),
            "not in canonical form",
        ),
        (lambda h: setattr(h, "method", "prefix"), "method 'lora' is not the global state's"),
    ],
)
def test_a_signed_but_unusable_site_config_is_refused(edit: object, match: str) -> None:
    """Signed by the coordinator and still refused: a config that does not parse, lacks a
    setting, is not canonical (its hash would not name the signed bytes), or disagrees with the
    global state's method."""
    data, coordinator = _signed_with_header(edit)
    with pytest.raises(ForgedGlobalState, match=match):
        open_global(data, coordinator.public_key())


def test_every_byte_of_the_site_config_is_covered_by_the_signature() -> None:
    data, coordinator = _signed_with_header(lambda h: None)
    assert open_global(data, coordinator.public_key()).config == SITE_CONFIG
    signed = pb.SignedGlobalState()
    signed.ParseFromString(data)
    config = SITE_CONFIG.to_json().encode()
    start = signed.header.index(config)
    for i in range(start, start + len(config), 7):
        header = bytearray(signed.header)
        header[i] ^= 0x01
        forged = pb.SignedGlobalState(
            header=bytes(header), payload=signed.payload, signature=signed.signature
        )
        with pytest.raises(ForgedGlobalState, match="not signed by the coordinator"):
            open_global(forged.SerializeToString(), coordinator.public_key())


def test_the_coordinator_signs_only_a_config_of_the_global_state_s_method() -> None:
    with pytest.raises(ValueError, match="method 'lora' is not 'prefix'"):
        sign_global(
            {},
            run_token="t",
            round=1,
            method="prefix",
            fingerprint="f",
            run_public=bytes(32),
            config=SITE_CONFIG,
            coordinator=crypto.new_identity(),
        )


# -- sealed evaluations ---------------------------------------------------------------------------

EVAL_SITE, EVAL_RUN, OTHER = crypto.new_identity(), crypto.new_run_key(), crypto.new_identity()
EVAL_ARGS = {"run_token": "tok", "round": 3, "fingerprint": "sha256:fp"}


def _sealed_evaluation(**changes: object) -> bytes:
    args: dict = {
        **EVAL_ARGS,
        "site_id": "A",
        "run_public": crypto.raw_public(EVAL_RUN),
        "identity": EVAL_SITE,
        **changes,
    }
    return seal_evaluation({"n-test": 3.0, "auc": 0.5}, [1, 0, 2], [0, 0, 0], **args)


def _open_evaluation(data: bytes, **changes: object) -> object:
    args: dict = {**EVAL_ARGS, "run_key": EVAL_RUN, "sites": {"A": EVAL_SITE.public_key()}}
    return open_evaluation(data, **{**args, **changes})


def test_a_sealed_evaluation_opens_only_for_its_run_key_with_what_the_site_sealed() -> None:
    opened = _open_evaluation(_sealed_evaluation())
    assert opened == OpenedEvaluation("A", {"n-test": 3.0, "auc": 0.5}, [1, 0, 2], [0, 0, 0])
    assert b"auc" not in _sealed_evaluation()  # the metrics travel encrypted


def _flip_ciphertext(data: bytes) -> bytes:
    sealed = pb.SealedEvaluation()
    sealed.ParseFromString(data)
    sealed.ciphertext = bytes([sealed.ciphertext[0] ^ 1]) + sealed.ciphertext[1:]
    return sealed.SerializeToString()


@pytest.mark.parametrize(
    ("data", "opening", "reason"),
    [
        (b"\xff" * 70_000, {}, "too-large"),
        (b"\xff\xff", {}, "malformed"),
        (None, {"run_token": "other"}, "wrong-run"),
        (None, {"round": 2}, "wrong-round"),
        (None, {"fingerprint": "sha256:other"}, "fingerprint"),
        (None, {"sites": {"B": EVAL_SITE.public_key()}}, "unknown-site"),
        # Signed by a key not A's: another registered site's (sent under A's name), or none.
        (None, {"sites": {"A": OTHER.public_key(), "B": EVAL_SITE.public_key()}}, "bad-signature"),
        (None, {"sites": {"A": OTHER.public_key()}}, "tampered"),
        (None, {"run_key": crypto.new_run_key()}, "tampered"),
    ],
)
def test_a_sealed_evaluation_is_rejected_with_its_reason(
    data: bytes | None, opening: dict, reason: str
) -> None:
    with pytest.raises(DeltaRejected) as info:
        _open_evaluation(_sealed_evaluation() if data is None else data, **opening)
    assert info.value.reason == reason


def test_an_altered_evaluation_fails_its_signature_before_anything_is_decrypted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    altered = _flip_ciphertext(_sealed_evaluation())

    def never(*_args: object) -> None:
        raise AssertionError("decrypted before the signature was checked")

    monkeypatch.setattr(crypto, "unseal", never)
    with pytest.raises(DeltaRejected) as info:
        _open_evaluation(altered)
    assert info.value.reason == "tampered"
