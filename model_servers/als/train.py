"""Train the ALS model on the mock world's histories and write its artefact (`make model-servers`).

``python -m model_servers.als.train [--seed 2026] [--out PATH]``, with the kserve venv's python
(which holds `implicit`; the gateway's lock never does). It trains on the `history` of every
test user ("test-0".."test-1999") and validation user ("validation-0".."validation-499") of
the quality benchmark, plus 3,000 background users ("train-N"): what a recommender would have
logged, never their held-out truth. Deterministic for a seed: the factors start from it and
each user's and item's solve runs on one thread.

The world is loaded from `mock_recommenders/world.py` by its path, not as
``mock_recommenders.world``: importing the package runs its ``__init__``, which starts with the
mocks' aiohttp servers, and this venv is for the model, not for them. world.py needs numpy only.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path
from types import ModuleType

# One BLAS thread, as implicit asks: its own loop does the parallel work (before numpy loads).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np
from scipy import sparse

from model_servers.als.artefact import ROOT, default_path

__all__ = ["TRAINING_USERS", "load_world_module", "main", "train"]

TRAINING_USERS = (
    [f"test-{n}" for n in range(2000)]
    + [f"validation-{n}" for n in range(500)]
    + [f"train-{n}" for n in range(3000)]
)
FACTORS = 32
ITERATIONS = 15
REGULARIZATION = 0.05
# Confidence of an observed interaction over an unobserved one (Hu, Koren and Volinsky 2008).
ALPHA = 10.0


def load_world_module() -> ModuleType:
    """`mock_recommenders/world.py` as a module of its own, without its package's ``__init__``."""
    name = "mock_recommenders_world"
    spec = importlib.util.spec_from_file_location(name, ROOT / "mock_recommenders" / "world.py")
    if spec is None or spec.loader is None:
        raise ImportError("mock_recommenders/world.py cannot be loaded")
    module = importlib.util.module_from_spec(spec)
    # Registered before it runs: its dataclasses look their module up in sys.modules.
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def train(seed: int, out: Path) -> None:
    """Train on the world of `seed` and write the artefact to `out` (atomically)."""
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    world = load_world_module().default_world(seed)
    item_ids = np.array([f"i{n}" for n in range(len(world.vectors))])
    histories = [world.user(user).history for user in TRAINING_USERS]
    indptr = np.cumsum([0] + [len(h) for h in histories]).astype(np.int64)
    items = np.concatenate(histories).astype(np.int32)
    user_items = sparse.csr_matrix(
        (np.ones(len(items), dtype=np.float32), items, indptr),
        shape=(len(TRAINING_USERS), len(item_ids)),
    )
    model = AlternatingLeastSquares(
        factors=FACTORS,
        iterations=ITERATIONS,
        regularization=REGULARIZATION,
        alpha=ALPHA,
        random_state=seed,
        num_threads=1,
    )
    with threadpool_limits(limits=1, user_api="blas"):
        model.fit(user_items, show_progress=False)
    counts = np.bincount(items, minlength=len(item_ids)).astype(np.float32)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    with partial.open("wb") as sink:
        np.savez_compressed(
            sink,
            seed=np.int64(seed),
            item_ids=item_ids,
            item_factors=np.asarray(model.item_factors, dtype=np.float32),
            user_ids=np.array(TRAINING_USERS),
            user_factors=np.asarray(model.user_factors, dtype=np.float32),
            history_indptr=indptr,
            history_items=items,
            popularity=counts / counts.max(),
        )
    partial.replace(out)


def main(argv: list[str] | None = None) -> None:
    """The command line: train, write, say where and how long it took."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=2026, help="the mock world's seed")
    parser.add_argument("--out", type=Path, default=None, help="the artefact (.npz) to write")
    args = parser.parse_args(argv)
    out = args.out if args.out is not None else default_path(args.seed)
    started = time.perf_counter()
    train(args.seed, out)
    took = time.perf_counter() - started
    print(f"trained ALS on {len(TRAINING_USERS)} users in {took:.1f} s: {out}")


if __name__ == "__main__":
    main()
