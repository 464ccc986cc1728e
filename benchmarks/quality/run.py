"""``python -m benchmarks quality``: each recommender and each fusion scored against the truth.

The mock recommenders rank a seeded synthetic world (`mock_recommenders.world`) in which every
user has a held-out truth: the items they went on to use, best first. This harness starts the
mocks and the gateway under gunicorn, asks the gateway for every test user once per fusion
strategy, and scores, against each user's truth:

- each single recommender's list (from the response's `result`),
- each fusion's `fused` list, as the gateway computed it,
- RRF with weights fitted on separate validation users (then served by a gateway configured
  with them), to show what the `weight:` setting can buy,
- an oracle that ranks by the user's true utility: the ceiling, since the truth itself is drawn
  with noise.

With ``--model-servers`` a real model joins the mocks: the ALS model of `model_servers/`
(trained on the mock world's histories) on KServe, as a fifth recommender `als` over KServe V1,
scored and fused like the mocks; and the same model on MLServer as `als-v2` over the Open
Inference Protocol with weight 0 (shadow: answered and scored as a single recommender, never
fused), to show both protocols give the same list.

Metrics, at k (10): NDCG@k with graded gains (the truth's first item gains T, its last 1, for
a truth of T items) and recall@k (the share of the truth found in the top k). Each is a mean
over users with a 95% confidence interval; the fusion-versus-best-single differences are paired
(same users) with their own interval.

This module runs it (the mocks, the gateways, the requests) and holds the command line; the
rest starts nothing: `benchmarks.quality.ranking_metrics` (the metrics and their statistics),
`benchmarks.quality.scoring` (the systems and their scores), `benchmarks.quality.weights` (the
fitting) and `benchmarks.quality.report` (the table, markdown and plot).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from benchmarks.harness.servers import (
    GATEWAY_COMMAND,
    gateway_env,
    mocks,
    pick,
    run_with_spinner,
    serve_gunicorn,
)
from benchmarks.quality.report import findings, table, write_all
from benchmarks.quality.scoring import comparisons, recommender_lists, score, summarise
from benchmarks.quality.weights import as_start_weights, fit_weights
from gateway.core.fusion import FUSIONS
from gateway.core.request_id import REQUEST_ID_HEADER
from mock_recommenders import DEFAULT_NAMES
from mock_recommenders.world import DEFAULT_SEED, default_world
from model_servers.processes import KServeProcess, MLServerProcess, missing_model_servers

__all__ = ["ALS", "ALS_SHADOW", "QualityPlan", "Source", "main", "parse_plan", "run_quality"]

ALS = "als"
"""The ALS model on KServe over V1, fused like the mocks (``--model-servers``)."""
ALS_SHADOW = "als-v2"
"""The same model on MLServer over the Open Inference Protocol, weight 0: scored, not fused."""


@dataclass
class QualityPlan:
    """What to score."""

    users: int = 2000
    validation_users: int = 500
    k: int = 10
    concurrency: int = 16
    world_seed: int = DEFAULT_SEED
    fusions: list[str] = field(default_factory=lambda: list(FUSIONS))
    rrf_k: int = 60
    window: int | None = None
    """The gateway's `fusion_window`: fuse from this many items per recommender (None: k)."""
    model_servers: bool = False
    """Also the ALS model: `als` (KServe, V1) fused, `als-v2` (MLServer, V2) as a shadow."""
    write_weights: str | None = None
    """Where to write the fitted weights as `feedback.learner.start_weights` (YAML)."""


@dataclass(frozen=True)
class Source:
    """One recommender the gateway is configured with."""

    name: str
    url: str
    protocol: str = "native"
    shadow: bool = False
    """Weight 0 whatever the weights: answered in `result` and scored, never fused."""
    same_as: str | None = None
    """Another source serving the same model, whose list this one's must equal."""

    def describe(self) -> dict[str, Any]:
        """What the results record of it (not its URL: a free port, different every run)."""
        return {
            "name": self.name,
            "protocol": self.protocol,
            "shadow": self.shadow,
            "same_as": self.same_as,
        }


# Talking to the gateway


async def _ask_all(
    url: str, asks: list[tuple[str, str]], k: int, concurrency: int
) -> dict[tuple[str, str], dict[str, Any] | None]:
    """POST one request per (user, fusion); the JSON of each complete answer, else None."""
    import aiohttp

    answers: dict[tuple[str, str], dict[str, Any] | None] = {}
    queue = list(reversed(asks))
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:

        async def worker() -> None:
            while queue:
                user, fusion = queue.pop()
                body = {"user_id": user, "resultSize": k, "fusion": fusion}
                # A fixed request id: interleaving is seeded by it, so reruns agree.
                headers = {REQUEST_ID_HEADER: f"quality-{user}-{fusion}"}
                try:
                    async with session.post(url, json=body, headers=headers) as response:
                        answer = await response.json() if response.status == 200 else None
                except (aiohttp.ClientError, TimeoutError):
                    answer = None
                complete = answer is not None and answer.get("complete") is True
                answers[user, fusion] = answer if complete else None

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return answers


@contextlib.contextmanager
def _gateway(
    sources: list[Source], weights: dict[str, float], window: int | None, log: Path
) -> Iterator[str]:
    recommenders: list[dict[str, Any]] = []
    for source in sources:
        weight = 0.0 if source.shadow else weights[source.name]
        recommender = {"name": source.name, "url": source.url, "weight": weight}
        recommender["timeout_ms"] = 5000
        if source.protocol != "native":
            recommender["protocol"] = source.protocol
        recommenders.append(recommender)
    # Quality, not speed, is measured: no answer may be cut short by a deadline, nor shed by
    # an adaptive limit that a busy machine's loop lag has lowered (a shed user is unscored).
    settings: dict[str, object] = {
        "deadline_ms": 10000,
        "log_requests": "false",
        "admission__adaptive": "false",
    }
    if window is not None:
        settings["fusion_window"] = window
    env = gateway_env(recommenders, **settings)
    with serve_gunicorn(GATEWAY_COMMAND, log, env) as (url, _):
        yield f"{url}/recommendation"


def _model_servers(stack: contextlib.ExitStack, logs: Path) -> list[Source]:
    """Start the ALS model on KServe and on MLServer (stopped with `stack`); their sources."""
    kserve = stack.enter_context(KServeProcess(log=logs / "kserve.log"))
    mlserver = stack.enter_context(MLServerProcess(log=logs / "mlserver.log"))
    return [
        Source(ALS, kserve.v1_url("als"), "kserve-v1"),
        Source(ALS_SHADOW, mlserver.v2_url("als"), "open-inference", shadow=True, same_as=ALS),
    ]


def _agreement(
    sources: list[Source], answers: list[dict[str, Any] | None]
) -> dict[str, dict[str, Any]]:
    """For each source with a `same_as`: in how many answers its list equals the other's."""
    found: dict[str, dict[str, Any]] = {}
    for source in sources:
        if source.same_as is None:
            continue
        compared = same = 0
        for answer in answers:
            if answer is None:
                continue
            lists = recommender_lists(answer)
            if source.name in lists and source.same_as in lists:
                compared += 1
                ids = [
                    [item["id"] for item in lists[n]["items"]]
                    for n in (source.name, source.same_as)
                ]
                same += ids[0] == ids[1]
        found[source.name] = {"same_as": source.same_as, "answers": compared, "same": same}
    return found


# The run


def run_quality(plan: QualityPlan, out: Path, advance: Callable[[str], None]) -> dict[str, Any]:
    """Score `plan`, writing logs under `out`; return the results."""
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    world = default_world(plan.world_seed)
    test_users = [f"test-{n}" for n in range(plan.users)]
    validation_users = [f"validation-{n}" for n in range(plan.validation_users)]

    def ask(url: str, asks: list[tuple[str, str]]) -> dict[tuple[str, str], Any]:
        return asyncio.run(_ask_all(url, asks, plan.k, plan.concurrency))

    with contextlib.ExitStack() as stack:
        fleet = stack.enter_context(
            mocks(list(DEFAULT_NAMES), logs / "mocks.log", "--world-seed", str(plan.world_seed))
        )
        sources = [Source(name, fleet.url(name)) for name in DEFAULT_NAMES]
        if plan.model_servers:
            advance("the ALS model on KServe and MLServer")
            sources += _model_servers(stack, logs)
        fused = [source.name for source in sources if not source.shadow]
        advance("gateway with equal weights: every fusion")
        equal = dict.fromkeys(fused, 1.0)
        with _gateway(sources, equal, plan.window, logs / "gateway.log") as url:
            answers = ask(url, [(u, f) for u in test_users for f in plan.fusions])
            advance("gateway with equal weights: validation users")
            validation = ask(url, [(u, "rrf") for u in validation_users])
        advance("fitting RRF weights on the validation users")
        fitting = [
            (recommender_lists(answer), world.truth(user))
            for (user, _), answer in validation.items()
            if answer is not None
        ]
        weights = fit_weights(fitting, plan.k, plan.rrf_k, names=fused) if fitting else {}
        advance("gateway with fitted weights")
        fitted: dict[tuple[str, str], Any] = {}
        if weights:
            with _gateway(sources, weights, plan.window, logs / "gateway-fitted.log") as url:
                fitted = ask(url, [(u, "rrf") for u in test_users])

    names = [source.name for source in sources]
    scores, scored, inconsistent = score(
        test_users, answers, fitted, world, plan.fusions, plan.k, recommenders=names
    )
    every_answer = [*answers.values(), *validation.values(), *fitted.values()]
    results: dict[str, Any] = {
        "plan": asdict(plan),
        "started": started,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "users_asked": len(test_users),
        "users_scored": scored,
        "inconsistent_lists": inconsistent,
        "recommenders": [source.describe() for source in sources],
        "same_lists": _agreement(sources, every_answer),
        "validation_users_used": len(fitting),
        "fitted_weights": weights,
        "systems": summarise(scores, names),
    }
    results["comparisons"] = comparisons(scores, names)
    return results


# The command line


def parse_plan(argv: list[str] | None = None) -> tuple[QualityPlan, Path]:
    """The plan and output folder the command line asks for."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks quality",
        description="Score each recommender and each fusion against the synthetic world's truth.",
    )
    parser.add_argument("--users", type=int, default=2000, help="test users (2000)")
    parser.add_argument(
        "--validation-users", type=int, default=500, help="other users to fit weights on (500)"
    )
    parser.add_argument("--k", type=int, default=10, help="list length scored (10)")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight (16)")
    parser.add_argument("--world-seed", type=int, default=DEFAULT_SEED, help="the world's seed")
    parser.add_argument("--fusions", help=f"comma-separated subset of {','.join(FUSIONS)}")
    parser.add_argument(
        "--window",
        type=int,
        help="the gateway's fusion_window: fuse from this many items per recommender (default k)",
    )
    parser.add_argument(
        "--model-servers",
        action="store_true",
        help=f"also the real ALS model: `{ALS}` on KServe over V1, fused like the mocks, and "
        f"`{ALS_SHADOW}` on MLServer over the Open Inference Protocol, weight 0 (scored, not "
        "fused); needs `make model-servers`",
    )
    parser.add_argument(
        "--write-weights",
        type=Path,
        metavar="FILE",
        help="also write the fitted weights in the config's form, as where the gateway's "
        "learner starts (feedback.learner.start_weights)",
    )
    parser.add_argument("--quick", action="store_true", help="200 users, 100 to fit on")
    parser.add_argument(
        "--out", type=Path, help="output folder (default benchmarks/results/quality-<timestamp>)"
    )
    args = parser.parse_args(argv)
    plan = QualityPlan(
        users=200 if args.quick else args.users,
        validation_users=100 if args.quick else args.validation_users,
        k=args.k,
        concurrency=args.concurrency,
        world_seed=args.world_seed,
        window=args.window,
        model_servers=args.model_servers,
    )
    if plan.users < 2 or plan.validation_users < 0 or not 1 <= plan.k <= 100:
        parser.error("--users must be at least 2, --validation-users at least 0, --k 1 to 100")
    if plan.window is not None and not plan.k <= plan.window <= 100:
        parser.error("--window must be from --k to 100")
    if plan.model_servers and (missing := missing_model_servers()) is not None:
        parser.error(f"--model-servers: {missing}")
    if args.fusions:
        try:
            plan.fusions = pick(args.fusions, FUSIONS, "fusions")
        except ValueError as exc:
            parser.error(str(exc))
    if "rrf" not in plan.fusions and plan.validation_users:
        plan.fusions.insert(0, "rrf")  # the fitted weights are compared with plain RRF
    if args.write_weights is not None and not plan.validation_users:
        parser.error("--write-weights needs validation users to fit the weights on")
    plan.write_weights = None if args.write_weights is None else str(args.write_weights)
    out = args.out or Path("benchmarks/results") / time.strftime("quality-%Y%m%d-%H%M%S")
    return plan, out


def write_start_weights(path: Path, results: dict[str, Any]) -> Path:
    """The fitted weights as `feedback.learner.start_weights`, in YAML with how they were made."""
    fitted = results["fitted_weights"]
    start = as_start_weights(fitted)
    scored = {row["system"]: row["ndcg"] for row in results["systems"]}
    best = max((n for n in fitted if n in scored), key=lambda n: scored[n], default=None)
    lines = [
        "# RRF weights fitted offline by `python -m benchmarks quality` on "
        f"{results['validation_users_used']} validation users,",
        f"# seed {results['plan']['world_seed']}: where the gateway's learner starts. "
        "Merge into the config, or set",
        f"# GATEWAY_FEEDBACK__LEARNER__START_WEIGHTS='{json.dumps(start)}'.",
    ]
    if best is not None and "rrf, fitted weights" in scored:
        lines.append(
            f"# On the test users: NDCG@{results['plan']['k']} "
            f"{scored['rrf, fitted weights']:.3f} with these, {scored[best]:.3f} for {best} alone."
        )
    body = {"feedback": {"learner": {"start_weights": start}}}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n" + yaml.safe_dump(body, sort_keys=False))
    return path


def main(argv: list[str] | None = None) -> int:
    """Run the quality benchmark with a progress bar, then print and save the figures."""
    plan, out = parse_plan(argv)
    out.mkdir(parents=True, exist_ok=True)
    results, console = run_with_spinner(lambda advance: run_quality(plan, out, advance))
    written = write_all(results, out)
    if plan.write_weights is not None and results.get("fitted_weights"):
        written.append(write_start_weights(Path(plan.write_weights), results))
    console.print(table(results))
    for line in findings(results):
        console.print(f"  {line}")
    console.print(f"\nwritten: {', '.join(str(p) for p in written)}")
    return 0 if results["users_scored"] else 1
