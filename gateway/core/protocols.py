"""The wire protocols a recommender can speak: the gateway's own, KServe V1, Open Inference.

Each recommender's `protocol` setting picks one (`gateway.config.RecommenderSettings`):

- ``native``: the gateway's own small JSON. The body sent is the frontend's request as
  forwarded (`{"user_id": ..., "resultSize": ...}`), the answer is `{"items": [{"id",
  "score"}, ...]}` read as it is.
- ``kserve-v1``: KServe's V1 protocol (`POST /v1/models/{m}:predict`): the native body B is
  sent as `{"instances": [B]}`, and the answer's `predictions[0]` is read as a native answer;
  it must be an object with an `items` list.
- ``open-inference``: the Open Inference Protocol, KServe's "V2" (`POST
  /v2/models/{m}[/versions/{v}]/infer`), spoken by KServe, Seldon MLServer, Triton and others.
  The request is two typed tensors: `user_id` (BYTES, shape [1], left out for a request
  without a user) and `result_size` (INT32, shape [1]), with the request id as the inference
  request's `id` and the configured `parameters`. The answer's outputs `item_ids` (BYTES, or an
  integer type, read as text) and `scores` (FP16, FP32 or FP64), each of shape [n] or [1, n],
  their data flat in row-major order (or nested as the shape says), become the items, in the
  order given. The names of the inputs and outputs are settings (`OpenInferenceSettings`).

An answer that does not fit its protocol (an output missing, shapes that disagree with each
other or with the data, a wrong datatype, a score that is not a finite number) raises
`AnswerMismatch` naming what is wrong; the client turns it into that recommender's error
(`BadRecommenderResponse`): never a 500, and never a guess at what was meant.

Each protocol also says where its server answers whether the model is ready
(`readiness_url`): KServe V1 `GET /v1/models/{m}`, Open Inference `GET .../ready`; the
gateway's own protocol has none unless the recommender's `ready_url` names one.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any, ClassVar, Final

__all__ = [
    "KSERVE_V1",
    "NATIVE",
    "PROTOCOL_NAMES",
    "AnswerMismatch",
    "KServeV1",
    "Native",
    "OpenInference",
    "WireProtocol",
    "url_problem",
]

PROTOCOL_NAMES: Final = ("native", "kserve-v1", "open-inference")

# Where each protocol's servers take predictions, as the URL's path must end (the model's name
# and, for V2, an optional version): checked in the settings, so that the readiness URL derived
# from it is the server's own.
_KSERVE_V1_PATH = re.compile(r"^(?P<base>.*)/v1/models/(?P<model>[^/:]+):predict$")
_OPEN_INFERENCE_PATH = re.compile(
    r"^(?P<base>.*)/v2/models/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer$"
)

# The Open Inference Protocol's datatypes the gateway reads item ids and scores from.
_INTEGER_TYPES = frozenset(
    {"INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"}
)
_ID_TYPES = frozenset({"BYTES"}) | _INTEGER_TYPES
_SCORE_TYPES = frozenset({"FP16", "FP32", "FP64"})


class AnswerMismatch(ValueError):
    """A recommender's answer does not fit its protocol; the message says how."""


class WireProtocol:
    """How one recommender is asked, and how its answer reads as a native one."""

    name: ClassVar[str]

    def request_body(self, native: bytes, request_id: str | None) -> bytes:
        """The body to send, from the native body every recommender's request starts from."""
        return native

    def native_answer(self, answer: Any) -> Any:
        """The recommender's parsed answer as a native one (`{"items": [...]}`)."""
        return answer

    def readiness_url(self, url: str) -> str | None:
        """Where the server of the model at `url` says whether it is ready (None: nowhere)."""
        return None


class Native(WireProtocol):
    """The gateway's own JSON, sent and read as it is."""

    name: ClassVar[str] = "native"


class KServeV1(WireProtocol):
    """KServe's V1 protocol: one instance, the native body; one prediction, a native answer."""

    name: ClassVar[str] = "kserve-v1"

    def request_body(self, native: bytes, request_id: str | None) -> bytes:
        return b'{"instances":[' + native + b"]}"

    def native_answer(self, answer: Any) -> Any:
        if type(answer) is not dict:
            raise AnswerMismatch("the answer is not a JSON object")
        predictions = answer.get("predictions")
        if type(predictions) is not list:
            raise AnswerMismatch("the answer has no `predictions` list")
        if len(predictions) != 1:
            raise AnswerMismatch(
                f"`predictions` holds {len(predictions)} answers for the 1 instance sent"
            )
        prediction = predictions[0]
        if type(prediction) is not dict or type(prediction.get("items")) is not list:
            raise AnswerMismatch("`predictions[0]` is not an object with an `items` list")
        return prediction

    def readiness_url(self, url: str) -> str | None:
        found = _KSERVE_V1_PATH.match(url)
        return f"{found['base']}/v1/models/{found['model']}" if found else None


class OpenInference(WireProtocol):
    """The Open Inference Protocol (V2): typed tensors in, typed tensors out."""

    name: ClassVar[str] = "open-inference"

    def __init__(
        self,
        user_input: str = "user_id",
        size_input: str = "result_size",
        ids_output: str = "item_ids",
        scores_output: str = "scores",
        parameters: Mapping[str, Any] | None = None,
    ):
        self.user_input = user_input
        self.size_input = size_input
        self.ids_output = ids_output
        self.scores_output = scores_output
        self.parameters = dict(parameters or {})

    def request_body(self, native: bytes, request_id: str | None) -> bytes:
        fields = json.loads(native)
        inputs = []
        user_id = fields.get("user_id")
        if user_id is not None:
            inputs.append(
                {"name": self.user_input, "shape": [1], "datatype": "BYTES", "data": [user_id]}
            )
        inputs.append(
            {
                "name": self.size_input,
                "shape": [1],
                "datatype": "INT32",
                "data": [fields["resultSize"]],
            }
        )
        request: dict[str, Any] = {"inputs": inputs}
        if request_id is not None:
            request = {"id": request_id, **request}
        if self.parameters:
            request["parameters"] = self.parameters
        return json.dumps(request, separators=(",", ":")).encode()

    def native_answer(self, answer: Any) -> Any:
        if type(answer) is not dict:
            raise AnswerMismatch("the answer is not a JSON object")
        outputs = answer.get("outputs")
        if type(outputs) is not list:
            raise AnswerMismatch("the answer has no `outputs` list")
        ids_type, ids = self._output(outputs, self.ids_output, _ID_TYPES)
        _, scores = self._output(outputs, self.scores_output, _SCORE_TYPES)
        if len(ids) != len(scores):
            raise AnswerMismatch(
                f"output `{self.scores_output}` holds {len(scores)} values and "
                f"`{self.ids_output}` {len(ids)}"
            )
        items = []
        for position, (item_id, score) in enumerate(zip(ids, scores, strict=True)):
            if ids_type == "BYTES":
                if type(item_id) is not str:
                    raise AnswerMismatch(
                        f"output `{self.ids_output}` holds a {_kind(item_id)} at {position}, "
                        "not a string"
                    )
            elif type(item_id) is not int:
                raise AnswerMismatch(
                    f"output `{self.ids_output}` ({ids_type}) holds a {_kind(item_id)} at "
                    f"{position}, not an integer"
                )
            if type(score) not in (float, int) or not math.isfinite(score):
                raise AnswerMismatch(
                    f"output `{self.scores_output}` holds {_shown(score)} at {position}, "
                    "not a finite number"
                )
            items.append({"id": str(item_id), "score": float(score)})
        native: dict[str, Any] = {"items": items}
        for key in ("model_name", "model_version"):
            value = answer.get(key)
            if type(value) is str:
                native[key] = value
        return native

    def _output(
        self, outputs: list[Any], name: str, datatypes: frozenset[str]
    ) -> tuple[str, list[Any]]:
        """Output `name`'s datatype and its values, flat, once its shape and type are checked."""
        found = [o for o in outputs if type(o) is dict and o.get("name") == name]
        if not found:
            named = [o.get("name") for o in outputs if type(o) is dict]
            given = ", ".join(f"`{n}`" for n in named if type(n) is str) or "none"
            raise AnswerMismatch(f"output `{name}` is missing (outputs: {given})")
        if len(found) > 1:
            raise AnswerMismatch(f"output `{name}` appears {len(found)} times")
        output = found[0]
        datatype = output.get("datatype")
        if datatype not in datatypes:
            wanted = " or ".join(sorted(datatypes)) if len(datatypes) < 4 else "BYTES or integer"
            raise AnswerMismatch(f"output `{name}` has datatype {_shown(datatype)}, not {wanted}")
        shape = output.get("shape")
        if (
            type(shape) is not list
            or not all(type(d) is int and d >= 0 for d in shape)
            or not (len(shape) == 1 or (len(shape) == 2 and shape[0] == 1))
        ):
            raise AnswerMismatch(f"output `{name}` has shape {_shown(shape)}, not [n] or [1, n]")
        data = output.get("data")
        if type(data) is not list:
            raise AnswerMismatch(f"output `{name}` has no `data` list")
        if len(shape) == 2 and len(data) == 1 and type(data[0]) is list:
            data = data[0]  # nested as the shape says: [[...]]
        if len(data) != shape[-1]:
            raise AnswerMismatch(f"output `{name}` has shape {shape} but {len(data)} values")
        return datatype, data

    def readiness_url(self, url: str) -> str | None:
        found = _OPEN_INFERENCE_PATH.match(url)
        return f"{url.removesuffix('/infer')}/ready" if found else None


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _shown(value: object) -> str:
    """A value of an answer, shown in a reason: short, on one line."""
    text = json.dumps(value) if value is None or type(value) in (list, str, int, float) else ""
    text = text or type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


NATIVE: Final = Native()
KSERVE_V1: Final = KServeV1()


def url_problem(protocol: str, url: str) -> str | None:
    """Why `url` cannot be a recommender URL of `protocol`, or None if it can."""
    path = url.split("?", 1)[0]
    if protocol == KServeV1.name and not _KSERVE_V1_PATH.match(path):
        return "a kserve-v1 recommender's URL must end in /v1/models/<model>:predict"
    if protocol == OpenInference.name and not _OPEN_INFERENCE_PATH.match(path):
        return (
            "an open-inference recommender's URL must end in /v2/models/<model>/infer "
            "(or /v2/models/<model>/versions/<version>/infer)"
        )
    return None
