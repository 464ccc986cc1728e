"""The ALS model as an MLServer runtime, served over V2 (the Open Inference Protocol).

``python -m model_servers.als.mlserver_runtime --http-port 0 [--model PATH]``, with the mlserver
venv's python and the repository on ``sys.path``: writes MLServer's settings into a temporary
directory (``settings.json``, and ``als/`` and ``als-broken/`` with a ``model-settings.json``
each) and runs ``mlserver start`` on it in this process. The same inputs and outputs as the
KServe server's V2 (`model_servers.als.kserve_server`): ``user_id`` (BYTES [1], optional) and
``result_size`` (INT32 [1], optional) in, ``item_ids`` (BYTES [1, n]) and ``scores``
(FP32 [1, n]) out; ``als-broken`` answers with ``scores`` one item short.

The settings, each for a reason: host 127.0.0.1 (MLServer binds 0.0.0.0 by default); the HTTP
port as given (0: a free one, reported in uvicorn's log line); gRPC, which MLServer 1.7 cannot
switch off, on port 0 (a free one); metrics off (``metrics_endpoint: null``), else a server of
their own on 8082; and ``parallel_workers: 0``: with the default (1), its inference pool fails to
start under uvloop 0.23 and the server exits with code 0, as though it had been stopped.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from mlserver import MLModel
from mlserver.errors import InferenceError
from mlserver.types import InferenceRequest, InferenceResponse, RequestInput, ResponseOutput

from model_servers.als.artefact import (
    DEFAULT_RESULT_SIZE,
    ALSModel,
    Ranking,
    default_path,
    result_size,
)

__all__ = ["ALSRuntime", "BrokenALSRuntime", "main", "write_settings"]

RUNTIME = "model_servers.als.mlserver_runtime"


class ALSRuntime(MLModel):  # type: ignore[misc]
    """The ALS artefact named by the model's ``parameters.uri``, ranking for one user a request."""

    async def load(self) -> bool:
        """Read the artefact; the model is ready (``/v2/models/NAME/ready``: 200) once read."""
        self.model = ALSModel(Path(self.settings.parameters.uri))
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        """`item_ids` and `scores` for the request's user (popularity when none)."""
        inputs = {each.name: each for each in payload.inputs}
        user_id = _one_value(inputs.get("user_id"))
        size = _one_value(inputs.get("result_size"))
        try:
            ranking = self.model.recommend(
                None if user_id is None else str(user_id),
                result_size(DEFAULT_RESULT_SIZE if size is None else size),
            )
        except ValueError as exc:
            raise InferenceError(str(exc)) from exc
        return InferenceResponse(
            model_name=self.name, id=payload.id, outputs=self.outputs_for(ranking)
        )

    def outputs_for(self, ranking: Ranking) -> list[ResponseOutput]:
        """`item_ids` (BYTES) and `scores` (FP32), each of shape [1, n]."""
        n = len(ranking.item_ids)
        scores = [float(s) for s in ranking.scores]
        return [
            ResponseOutput(name="item_ids", shape=[1, n], datatype="BYTES", data=ranking.item_ids),
            ResponseOutput(name="scores", shape=[1, n], datatype="FP32", data=scores),
        ]


class BrokenALSRuntime(ALSRuntime):
    """Right rankings in a malformed answer: `scores` of shape [1, n - 1] beside [1, n] ids."""

    def outputs_for(self, ranking: Ranking) -> list[ResponseOutput]:
        """The ids whole, the scores one short."""
        n = len(ranking.item_ids)
        scores = [float(s) for s in ranking.scores[:-1]]
        return [
            ResponseOutput(name="item_ids", shape=[1, n], datatype="BYTES", data=ranking.item_ids),
            ResponseOutput(name="scores", shape=[1, n - 1], datatype="FP32", data=scores),
        ]


def _one_value(tensor: RequestInput | None) -> object | None:
    """The single value of an input, None when there is no such input."""
    if tensor is None:
        return None
    values = list(tensor.data)
    if len(values) != 1 or tensor.shape not in ([1], [1, 1]):
        raise InferenceError(f"{tensor.name} must hold one value (shape [1])")
    value: object = values[0]
    return value.decode() if isinstance(value, bytes) else value


def write_settings(folder: Path, model: Path, http_port: int) -> None:
    """MLServer's settings for both models, into `folder` (see the module's docstring)."""
    settings: dict[str, Any] = {
        "host": "127.0.0.1",
        "http_port": http_port,
        "grpc_port": 0,
        "metrics_endpoint": None,
        "parallel_workers": 0,
        "load_models_at_startup": True,
    }
    (folder / "settings.json").write_text(json.dumps(settings, indent=2))
    for name, runtime in (("als", "ALSRuntime"), ("als-broken", "BrokenALSRuntime")):
        (folder / name).mkdir()
        model_settings = {
            "name": name,
            "implementation": f"{RUNTIME}.{runtime}",
            "parameters": {"uri": str(model.resolve())},
        }
        (folder / name / "model-settings.json").write_text(json.dumps(model_settings, indent=2))


def main() -> None:
    """Write the settings into a temporary directory and serve them until SIGTERM."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--http-port", type=int, default=0, help="0: a free port (logged)")
    parser.add_argument("--model", type=Path, default=None, help="the ALS artefact (.npz)")
    args = parser.parse_args()
    path = args.model if args.model is not None else default_path()
    if not path.is_file():
        sys.exit(f"no ALS model at {path}: run `make model-servers`")
    from mlserver.cli.main import main as mlserver

    with tempfile.TemporaryDirectory(prefix="mlserver-als-") as folder:
        write_settings(Path(folder), path, args.http_port)
        sys.argv = ["mlserver", "start", folder]
        mlserver()


if __name__ == "__main__":
    main()
