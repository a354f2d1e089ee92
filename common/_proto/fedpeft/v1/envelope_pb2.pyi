from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Codec(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CODEC_UNSPECIFIED: _ClassVar[Codec]
    CODEC_FP32: _ClassVar[Codec]
    CODEC_FP16: _ClassVar[Codec]
    CODEC_INT8: _ClassVar[Codec]
    CODEC_RING32: _ClassVar[Codec]
CODEC_UNSPECIFIED: Codec
CODEC_FP32: Codec
CODEC_FP16: Codec
CODEC_INT8: Codec
CODEC_RING32: Codec

class TensorSpec(_message.Message):
    __slots__ = ("name", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class DeltaHeader(_message.Message):
    __slots__ = ("schema_version", "run_token", "round", "site_id", "method", "model_fingerprint", "codec", "tensors", "num_examples")
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    RUN_TOKEN_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    schema_version: int
    run_token: str
    round: int
    site_id: str
    method: str
    model_fingerprint: str
    codec: Codec
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    num_examples: int
    def __init__(self, schema_version: _Optional[int] = ..., run_token: _Optional[str] = ..., round: _Optional[int] = ..., site_id: _Optional[str] = ..., method: _Optional[str] = ..., model_fingerprint: _Optional[str] = ..., codec: _Optional[_Union[Codec, str]] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., num_examples: _Optional[int] = ...) -> None: ...

class SealedDelta(_message.Message):
    __slots__ = ("header", "ephemeral_public_key", "nonce", "ciphertext", "signature")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    EPHEMERAL_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    header: bytes
    ephemeral_public_key: bytes
    nonce: bytes
    ciphertext: bytes
    signature: bytes
    def __init__(self, header: _Optional[bytes] = ..., ephemeral_public_key: _Optional[bytes] = ..., nonce: _Optional[bytes] = ..., ciphertext: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class GlobalStateHeader(_message.Message):
    __slots__ = ("schema_version", "run_token", "round", "method", "model_fingerprint", "tensors", "run_public_key", "site_config_json")
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    RUN_TOKEN_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    RUN_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    SITE_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    schema_version: int
    run_token: str
    round: int
    method: str
    model_fingerprint: str
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    run_public_key: bytes
    site_config_json: str
    def __init__(self, schema_version: _Optional[int] = ..., run_token: _Optional[str] = ..., round: _Optional[int] = ..., method: _Optional[str] = ..., model_fingerprint: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., run_public_key: _Optional[bytes] = ..., site_config_json: _Optional[str] = ...) -> None: ...

class SignedGlobalState(_message.Message):
    __slots__ = ("header", "payload", "signature")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    header: bytes
    payload: bytes
    signature: bytes
    def __init__(self, header: _Optional[bytes] = ..., payload: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class EvaluationHeader(_message.Message):
    __slots__ = ("schema_version", "run_token", "round", "site_id", "model_fingerprint")
    SCHEMA_VERSION_FIELD_NUMBER: _ClassVar[int]
    RUN_TOKEN_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    schema_version: int
    run_token: str
    round: int
    site_id: str
    model_fingerprint: str
    def __init__(self, schema_version: _Optional[int] = ..., run_token: _Optional[str] = ..., round: _Optional[int] = ..., site_id: _Optional[str] = ..., model_fingerprint: _Optional[str] = ...) -> None: ...

class EvaluationBody(_message.Message):
    __slots__ = ("metrics", "hist_pos", "hist_neg")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    METRICS_FIELD_NUMBER: _ClassVar[int]
    HIST_POS_FIELD_NUMBER: _ClassVar[int]
    HIST_NEG_FIELD_NUMBER: _ClassVar[int]
    metrics: _containers.ScalarMap[str, float]
    hist_pos: _containers.RepeatedScalarFieldContainer[int]
    hist_neg: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, metrics: _Optional[_Mapping[str, float]] = ..., hist_pos: _Optional[_Iterable[int]] = ..., hist_neg: _Optional[_Iterable[int]] = ...) -> None: ...

class SealedEvaluation(_message.Message):
    __slots__ = ("header", "ephemeral_public_key", "nonce", "ciphertext", "signature")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    EPHEMERAL_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    header: bytes
    ephemeral_public_key: bytes
    nonce: bytes
    ciphertext: bytes
    signature: bytes
    def __init__(self, header: _Optional[bytes] = ..., ephemeral_public_key: _Optional[bytes] = ..., nonce: _Optional[bytes] = ..., ciphertext: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...
