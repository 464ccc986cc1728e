"""The ALS model served by KServe's `ModelServer` over V1 and V2 (REST), on loopback only.

``python -m model_servers.als.kserve_server --http_port 0 [--model PATH]``, with the kserve
venv's python and the repository on ``sys.path``. Serves two models:

- ``als``: V1 ``{"instances": [{"user_id": "test-3", "resultSize": 10}]}`` ->
  ``{"predictions": [{"items": [{"id": "i12", "score": 0.93}, ...]}]}``; V2 inputs ``user_id``
  (BYTES [1], optional) and ``result_size`` (INT32 [1], optional) -> outputs ``item_ids``
  (BYTES [1, n]) and ``scores`` (FP32 [1, n]);
- ``als-broken``: the same requests, malformed answers (V2 shapes that disagree, V1 ``items``
  that is not a list), for the gateway's tests of a bad recommender.

kserve parses ``sys.argv`` when it is imported (its flags: ``--http_port``, ``--enable_grpc``,
``--workers``, ...), so this module is only ever run as a program, never imported by the
gateway or pytest. kserve 0.21 binds 0.0.0.0 with no flag to change it: the REST server class
`ModelServer` builds is replaced by one that binds 127.0.0.1 (`_LoopbackRESTServer`).
"""

from __future__ import annotations

import argparse
import os
import sys
import uuid
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import kserve
import kserve.model_server
import numpy as np
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse
from kserve.protocol.rest.server import RESTServer

from model_servers.als.artefact import (
    DEFAULT_RESULT_SIZE,
    ALSModel,
    Ranking,
    default_path,
    result_size,
)

__all__ = ["ALSServed", "BrokenALSServed", "main"]

LOOPBACK = "127.0.0.1"


class _LoopbackRESTServer(RESTServer):  # type: ignore[misc]
    """kserve's REST server, bound to loopback instead of every interface."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.config.host = LOOPBACK


class ALSServed(kserve.Model):  # type: ignore[misc]
    """The ALS artefact as a kserve model: V1 dicts in and out, V2 `InferRequest` in and out."""

    def __init__(self, name: str, path: Path) -> None:
        super().__init__(name)
        self.path = path
        self.model: ALSModel | None = None

    def load(self) -> bool:
        """Read the artefact; the model is ready (its readiness endpoints say 200) once read."""
        self.model = ALSModel(self.path)
        self.ready = True
        return True

    async def predict(
        self,
        payload: dict[str, Any] | InferRequest,
        headers: dict[str, str] | None = None,
        response_headers: dict[str, str] | None = None,
    ) -> dict[str, Any] | InferResponse:
        """Rank for each V1 instance, or for the one user of a V2 request."""
        if isinstance(payload, InferRequest):
            user_id, size = _v2_inputs(payload)
            return self.v2_answer(payload, self._rank(user_id, size))
        instances = payload.get("instances") if isinstance(payload, dict) else None
        if not isinstance(instances, list):
            raise InvalidInput('expected {"instances": [...]}')
        return {"predictions": [self.v1_prediction(self._v1_rank(each)) for each in instances]}

    def _v1_rank(self, instance: object) -> Ranking:
        if not isinstance(instance, dict):
            raise InvalidInput("each instance must be an object like the gateway's request body")
        user_id = instance.get("user_id")
        if user_id is not None and not isinstance(user_id, str):
            raise InvalidInput("user_id must be a string")
        return self._rank(user_id, instance.get("resultSize", DEFAULT_RESULT_SIZE))

    def _rank(self, user_id: str | None, size: object) -> Ranking:
        assert self.model is not None, "predict before load"
        try:
            return self.model.recommend(user_id, result_size(size))
        except ValueError as exc:
            raise InvalidInput(str(exc)) from exc

    def v1_prediction(self, ranking: Ranking) -> dict[str, Any]:
        """One V1 prediction: the gateway's native answer body."""
        scores = [round(float(s), 6) for s in ranking.scores]
        return {
            "items": [{"id": i, "score": s} for i, s in zip(ranking.item_ids, scores, strict=True)]
        }

    def v2_answer(self, request: InferRequest, ranking: Ranking) -> InferResponse:
        """The V2 answer: `item_ids` (BYTES) and `scores` (FP32), each of shape [1, n]."""
        n = len(ranking.item_ids)
        outputs = [
            InferOutput("item_ids", [1, n], "BYTES", data=list(ranking.item_ids)),
            InferOutput("scores", [1, n], "FP32", data=[float(s) for s in ranking.scores]),
        ]
        return InferResponse(_answer_id(request), self.name, outputs)


class BrokenALSServed(ALSServed):
    """Right rankings in malformed answers: `scores` one short in V2, `items` no list in V1."""

    def v1_prediction(self, ranking: Ranking) -> dict[str, Any]:
        """An `items` that is not a list."""
        return {"items": "not a list"}

    def v2_answer(self, request: InferRequest, ranking: Ranking) -> InferResponse:
        """`item_ids` of shape [1, n] and `scores` of shape [1, n - 1]."""
        n = len(ranking.item_ids)
        outputs = [
            InferOutput("item_ids", [1, n], "BYTES", data=list(ranking.item_ids)),
            InferOutput("scores", [1, n - 1], "FP32", data=[float(s) for s in ranking.scores[:-1]]),
        ]
        return InferResponse(_answer_id(request), self.name, outputs)


def _answer_id(request: InferRequest) -> str:
    # The request's id is optional in the protocol; kserve 0.21 answers 500 to a response
    # without one, so a request without an id gets an answer with a fresh one.
    return str(request.id) if request.id else str(uuid.uuid4())


def _one_value(request: InferRequest, name: str) -> object | None:
    """The single value of input `name`, None when the request has no such input."""
    tensor = request.get_input_by_name(name)
    if tensor is None:
        return None
    try:
        values = np.asarray(tensor.as_numpy()).ravel().tolist()
    except ValueError as exc:  # data that does not fit its shape, or its datatype
        raise InvalidInput(f"{name}: {exc}") from exc
    if len(values) != 1:
        raise InvalidInput(f"{name} must hold one value (shape [1])")
    value: object = values[0]
    return value.decode() if isinstance(value, bytes) else value


def _v2_inputs(request: InferRequest) -> tuple[str | None, object]:
    """The user (None when absent) and the result size (10 when absent) of a V2 request."""
    user_id = _one_value(request, "user_id")
    size = _one_value(request, "result_size")
    return (
        None if user_id is None else str(user_id),
        DEFAULT_RESULT_SIZE if size is None else size,
    )


def main() -> None:
    """Load both models and serve them until SIGTERM; kserve reads its own flags from argv."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--model", type=Path, default=None, help="the ALS artefact (.npz)")
    args, _ = parser.parse_known_args()
    path = args.model if args.model is not None else default_path()
    if not path.is_file():
        sys.exit(f"no ALS model at {path}: run `make model-servers`")
    kserve.model_server.RESTServer = _LoopbackRESTServer
    models = [ALSServed("als", path), BrokenALSServed("als-broken", path)]
    for model in models:
        model.load()
    kserve.ModelServer(workers=1, enable_grpc=False).start(models)


if __name__ == "__main__":
    main()
