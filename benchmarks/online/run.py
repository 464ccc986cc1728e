"""``python -m benchmarks online``: simulated users click, and the gateway learns from them.

It starts the mock recommenders and the gateway under gunicorn with feedback on (a SQLite
store in a temporary folder), then plays simulated users, one impression each: ask the
gateway for a recommendation, let the user click on the fused list as the click model says
(`mock_recommenders.clicks`, driven by the user's true utility), and POST the clicks to
``/feedback``. After every round of users it reads ``GET /experiments``: every
attribution figure reported is the gateway's own.

Two experiments, each on a fresh gateway and store:

- **sensitivity** (repeated over seeds): the best single recommender by NDCG@10 against the
  truth (computed here from the world) and the runner-up, compared both ways on the same
  users: a fifth of them in an arm that interleaves just those two (team-draft; the others'
  arm weights 0), two fifths each in an A/B arm showing one of the two alone. How many
  impressions does each method need before it is 95% sure which is better, by first passage
  and by a power calculation, with the user as the unit?
- **learning**: half the users interleaved (the learner's evidence: all four, multileaved),
  half in an RRF arm with the learnt weights, the learner on with a short interval. The
  weights over time against weights fitted offline on other users
  (`benchmarks.quality.weights`), and NDCG@10 of the learnt arm's fused lists, in windows,
  against the best single recommender on the same users, and beside it the rule the gateway
  shipped before (Hedge over net wins) replayed on the same counters and lists.

Two worlds (`--world`): **heavy-tailed** (the default), where users differ in how much they
click (each user's engagement drawn from Beta(0.5, 4.5); a few percent of impressions
clicked) and come back (visits per user ~Geometric, mean 5); and **alike**, the click model
alone, every user always engaged and seen once, as the benchmark was first built.

Two click models (`--click-model`): **pbm**, position-based (the default: rank r examined with
probability 1/r, whatever is above it), and **cascade** (the user reads down the list and stops
at the first click). `both` plays both experiments under each, on fresh gateways, with the same
users, arms and interleavings, and the results and report hold every figure per click model.

This module runs it; `benchmarks.online.play` holds the simulated users and their HTTP side,
`benchmarks.online.stats` the statistics, `benchmarks.online.analysis` the figures drawn from
a run, `benchmarks.online.summary` the runs over seeds, `benchmarks.online.report` the
findings and markdown, and `benchmarks.online.plots` the plots.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.harness.servers import (
    GATEWAY_COMMAND,
    gateway_env,
    mocks,
    run_with_spinner,
    serve_gunicorn,
)
from benchmarks.online.analysis import (
    analyse_learning,
    analyse_sensitivity,
    pooled,
    rank_recommenders,
)
from benchmarks.online.play import Rounds, learning_arm, play, single_arm, visits
from benchmarks.online.report import findings, write_all
from benchmarks.quality.weights import as_start_weights, fit_weights
from mock_recommenders import DEFAULT_NAMES
from mock_recommenders.clicks import CLICK_MODELS, ClickModel
from mock_recommenders.world import DEFAULT_SEED, World, default_world

__all__ = ["OnlinePlan", "main", "parse_plan", "run_online", "upside_down"]


WORLDS = ("heavy-tailed", "alike")
BOTH = "both"


@dataclass
class OnlinePlan:
    """What to simulate."""

    world: str = "heavy-tailed"
    """`heavy-tailed`: users differ in engagement and come back; `alike`: the click model alone."""
    sensitivity_impressions: int = 12000
    """Visits played per sensitivity run: a fifth interleaved, two fifths per A/B arm."""
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])
    """One sensitivity run per seed: other users, so other clicks."""
    learning_impressions: int = 8000
    round_size: int = 30
    """Impressions between two reads of /experiments."""
    windows: int = 8
    """Windows the learnt arm's impressions are cut into for NDCG over time."""
    concurrency: int = 8
    k: int = 10
    world_seed: int = DEFAULT_SEED
    validation_users: int = 500
    """Users the recommenders are ranked and the offline weights fitted on (not played)."""
    click_models: list[str] = field(default_factory=lambda: ["pbm"])
    """The click models played (`mock_recommenders.clicks.CLICK_MODELS`), each on its gateways."""
    eta: float = 1.0
    """The position-based model's bias: rank r examined with probability 1/r^eta."""
    continue_after_click: float = 0.0
    """The cascade's chance of reading on after a click (0: it stops at the first)."""
    threshold: float = 2.5
    slope: float = 2.0
    activity: tuple[float, float] | None = (0.5, 4.5)
    """Beta(a, b) of each user's engagement (`ClickModel.activity`); None: always engaged."""
    visits_per_user: float = 5.0
    """Mean impressions per user (geometric); 1: each user seen once."""
    warm_start: str = "fitted"
    """Where the learner starts: `fitted`, the offline-fitted weights as `start_weights`
    (`python -m benchmarks quality --write-weights`); `reversed`, a wrong prior (`upside_down`);
    `none`, the configured (equal) ones."""
    explore: str = "adaptive"
    """The interleaved arm's share: `adaptive`, falling with the preferences' intervals
    (`explore: true`) from half to `min_explore`; `fixed`, half the users throughout."""
    min_explore: float = 0.05
    """The adaptive interleaved arm's share at least (of its starting half)."""
    learning_seeds: list[int] = field(default_factory=lambda: [1])
    """One learning run per seed: other users, so other clicks."""
    learner: dict[str, str] = field(
        default_factory=lambda: {
            # The gateway's defaults, but for min_evidence: equal weights for the first
            # 2,000-3,000 impressions (heavy-tailed world; alike: 1,500, about 900), so that
            # the first windows show where learning starts from.
            "min_evidence": "300",
            "floor": "0.1",
            "max_weight": "5.0",
            "beta": "4.0",
            "prior": "50",
            "start_strength": "1000",
            "cold_start": "leader",
            "interval_s": "0.5",
        }
    )
    """The gateway's `feedback.learner` settings (as `GATEWAY_FEEDBACK__LEARNER__*`)."""

    @classmethod
    def alike(cls) -> OnlinePlan:
        """The world as first built: every user always engaged, each seen once."""
        plan = cls(world="alike", sensitivity_impressions=1500, activity=None, visits_per_user=1)
        plan.learner["min_evidence"] = "1500"
        return plan


@contextlib.contextmanager
def _gateway(
    urls: list[str], arms: list[dict[str, Any]], learner: dict[str, str], log: Path
) -> Iterator[str]:
    """A gateway with feedback on, a fresh SQLite store, and these experiment arms."""
    recommenders = [
        {"name": name, "url": url, "timeout_ms": 5000}
        for name, url in zip(DEFAULT_NAMES, urls, strict=True)
    ]
    with tempfile.TemporaryDirectory(prefix="online-feedback-") as folder:
        settings: dict[str, object] = {
            # Clicks, not speed, are measured: no answer may be cut short or shed.
            "deadline_ms": 10000,
            "log_requests": "false",
            "admission__adaptive": "false",
            "feedback__store": f"sqlite:///{Path(folder).resolve() / 'feedback.db'}",
            "feedback__salt": "online-benchmark",
            # Impressions written often, so /experiments soon counts every one played.
            "feedback__flush_interval_ms": 20,
            "feedback__experiments__arms": json.dumps(arms),
        }
        settings.update((f"feedback__learner__{key}", value) for key, value in learner.items())
        with serve_gunicorn(GATEWAY_COMMAND, log, gateway_env(recommenders, **settings)) as (
            url,
            _,
        ):
            yield url


def _validation_lists(world: World, users: list[str], k: int) -> list[tuple[Any, list[str]]]:
    """Each validation user's lists as the gateway would get them, with their truth."""
    return [
        (
            {name: {"items": world.ranking(name, user, k)} for name in DEFAULT_NAMES},
            world.truth(user),
        )
        for user in users
    ]


def upside_down(weights: dict[str, float]) -> dict[str, float]:
    """`weights` in reverse order of the recommenders: the largest given to the one with the
    smallest, and so on (ties keep their order): a prior as wrong as the fit is right."""
    ranked = sorted(weights, key=lambda name: (weights[name], name))
    values = sorted(weights.values(), reverse=True)
    return dict(zip(ranked, values, strict=True))


def _click_model_of(plan: OnlinePlan, name: str, world: World) -> ClickModel:
    """The plan's click model called `name`: the users' attraction and engagement, its setting."""
    settings: dict[str, Any] = {
        "threshold": plan.threshold,
        "slope": plan.slope,
        "activity": plan.activity,
    }
    if name == "pbm":
        settings["eta"] = plan.eta
    elif name == "cascade":
        settings["continue_after_click"] = plan.continue_after_click
    return ClickModel.named(name, world, **settings)


def run_online(plan: OnlinePlan, out: Path, advance: Callable[[str], None]) -> dict[str, Any]:
    """Simulate `plan`, writing logs under `out`; return the results, per click model."""
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    world = default_world(plan.world_seed)
    models = {name: _click_model_of(plan, name, world) for name in plan.click_models}

    advance("ranking the recommenders and fitting weights on validation users")
    validation = _validation_lists(
        world, [f"validation-{n}" for n in range(plan.validation_users)], plan.k
    )
    ranking = rank_recommenders(validation, plan.k)
    best, runner_up = ranking[0]["name"], ranking[1]["name"]
    fitted = fit_weights(validation, plan.k)

    results: dict[str, Any] = {
        "plan": asdict(plan),
        "started": started,
        "recommenders": ranking,
        "best": best,
        "runner_up": runner_up,
        "fitted_weights": fitted,
        "click_models": {},
    }
    with mocks(
        list(DEFAULT_NAMES), logs / "mocks.log", "--world-seed", str(plan.world_seed)
    ) as fleet:
        stage = _Stage([fleet.url(name) for name in DEFAULT_NAMES], world, best, runner_up, fitted)
        for name, model in models.items():
            # With several models, the progress line says whose users are playing.
            label = f"{name}: " if len(models) > 1 else ""
            progress = functools.partial(_labelled, advance, label)
            began = time.monotonic()
            played = _play_model(plan, stage, model, logs / name, progress)
            results["click_models"][name] = {**played, "seconds": round(time.monotonic() - began)}
    results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return results


def _labelled(advance: Callable[[str], None], label: str, text: str) -> None:
    advance(label + text)


@dataclass(frozen=True)
class _Stage:
    """What every click model is played against: the mocks, their world, the pair compared."""

    urls: list[str]
    world: World
    best: str
    runner_up: str
    fitted: dict[str, float]
    """Weights fitted offline on the validation users: the learnt ones' reference."""


def _play_model(
    plan: OnlinePlan,
    stage: _Stage,
    model: ClickModel,
    logs: Path,
    advance: Callable[[str], None],
) -> dict[str, Any]:
    """Both experiments, each on fresh gateways, with users who click by `model`; analysed."""
    logs.mkdir(parents=True, exist_ok=True)
    urls, best, runner_up = stage.urls, stage.best, stage.runner_up
    pair = (best, runner_up)
    rounds = Rounds(plan.round_size, plan.concurrency, plan.k)
    arms = [
        {
            "name": "interleave",
            "fusion": "interleave",
            "share": 1,
            # Weight 0: the other two are left out, so the two compared have the list.
            "weights": {name: 1.0 if name in pair else 0.0 for name in DEFAULT_NAMES},
        },
        *(
            {
                "name": f"ab-{shown}",
                "fusion": "rrf",
                # A/B needs more impressions than interleaving: it gets more users.
                "share": 2,
                "weights": {name: 1.0 if name == shown else 0.0 for name in DEFAULT_NAMES},
            }
            for shown in pair
        ),
    ]
    learning_off = {**plan.learner, "enabled": "false"}
    sensitivity = []
    for seed in plan.seeds:
        # The same users, arms and interleavings under every click model: only clicks differ.
        schedule = visits(f"s{seed}-u", plan.sensitivity_impressions, plan.visits_per_user, seed)
        with _gateway(urls, arms, learning_off, logs / f"gateway-seed-{seed}.log") as url:
            played, snapshots = asyncio.run(
                play(
                    url, schedule, model, single_arm, rounds, advance,
                    f"sensitivity, seed {seed}",
                )
            )  # fmt: skip
        run = analyse_sensitivity(played, snapshots, best, runner_up, plan.k)
        sensitivity.append({"seed": seed, **run})

    explore: dict[str, Any] = {"name": "interleave", "fusion": "interleave", "share": 1}
    if plan.explore == "adaptive":
        explore |= {"explore": True, "min_share": plan.min_explore}
    arms = [explore, {"name": "learned", "fusion": "rrf", "share": 1, "weights": "learned"}]
    learning_on = {**plan.learner, "enabled": "true"}
    if plan.warm_start == "fitted":
        learning_on["start_weights"] = json.dumps(as_start_weights(stage.fitted))
    elif plan.warm_start == "reversed":
        learning_on["start_weights"] = json.dumps(as_start_weights(upside_down(stage.fitted)))
    runs = []
    for seed in plan.learning_seeds:
        # Each user once: the NDCG intervals below take impressions as independent.
        prefix = "learn-u" if seed == 1 else f"learn-s{seed}-u"
        schedule = visits(prefix, plan.learning_impressions, 1, 0)
        log = logs / ("gateway-learning.log" if seed == 1 else f"gateway-learning-{seed}.log")
        with _gateway(urls, arms, learning_on, log) as url:
            played, snapshots = asyncio.run(
                play(url, schedule, model, learning_arm, rounds, advance, f"learning, seed {seed}")
            )
        runs.append(
            analyse_learning(
                played,
                snapshots,
                stage.world,
                best,
                stage.fitted,
                plan.k,
                plan.windows,
                min_evidence=int(plan.learner["min_evidence"]),
            )
        )
    # The first seed's run in full (as before), and what every seed served, pooled.
    return {"sensitivity": sensitivity, "learning": runs[0], "learning_pooled": pooled(runs)}


# The command line


def parse_plan(argv: list[str] | None = None) -> tuple[OnlinePlan, Path]:
    """The plan and output folder the command line asks for."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks online",
        description="Simulated users click; interleaving against A/B, and the learnt weights.",
    )
    parser.add_argument(
        "--world",
        choices=WORLDS,
        default=WORLDS[0],
        help="heavy-tailed: users differ in engagement and come back (the default); "
        "alike: every user always engaged and seen once, as first built",
    )
    parser.add_argument(
        "--click-model",
        choices=[*CLICK_MODELS, BOTH],
        default="pbm",
        help="how users click: pbm, position-based (the default); cascade, down the list to the "
        "first click; both: every experiment under each (twice the time)",
    )
    parser.add_argument(
        "--continue-after-click",
        type=float,
        default=OnlinePlan.continue_after_click,
        help="the cascade's chance of reading on after a click (0: it stops at the first)",
    )
    parser.add_argument(
        "--impressions",
        type=int,
        help="impressions per sensitivity run (heavy-tailed 12,000; alike 1,500)",
    )
    parser.add_argument(
        "--seeds", default="1,2,3,4,5", help="one sensitivity run per seed, comma-separated"
    )
    parser.add_argument(
        "--learning-impressions",
        type=int,
        default=OnlinePlan.learning_impressions,
        help=f"impressions in the learning run ({OnlinePlan.learning_impressions})",
    )
    parser.add_argument(
        "--warm-start",
        choices=["fitted", "reversed", "none"],
        default=OnlinePlan.warm_start,
        help="where learning starts: fitted, the offline-fitted weights (the default); "
        "reversed, the same upside down (a wrong prior); none, equal weights",
    )
    parser.add_argument(
        "--explore",
        choices=["adaptive", "fixed"],
        default=OnlinePlan.explore,
        help="the interleaved arm's share: adaptive, falling as the preferences narrow (the "
        "default); fixed, half the users",
    )
    parser.add_argument(
        "--learning-seeds", default="1", help="one learning run per seed, comma-separated (1)"
    )
    parser.add_argument("--concurrency", type=int, default=OnlinePlan.concurrency)
    parser.add_argument("--world-seed", type=int, default=DEFAULT_SEED, help="the world's seed")
    parser.add_argument(
        "--learner",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a feedback.learner setting: min_evidence, floor, max_weight, beta, prior, "
        "start_strength, cold_start, interval_s",
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: a few hundred users")
    parser.add_argument(
        "--out", type=Path, help="output folder (default benchmarks/results/online-<timestamp>)"
    )
    args = parser.parse_args(argv)
    try:
        seeds = [int(part) for part in args.seeds.split(",") if part.strip()]
    except ValueError:
        parser.error(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
    plan = OnlinePlan() if args.world == "heavy-tailed" else OnlinePlan.alike()
    plan.seeds, plan.world_seed = seeds, args.world_seed
    try:
        plan.learning_seeds = [int(part) for part in args.learning_seeds.split(",") if part]
    except ValueError:
        parser.error(f"--learning-seeds: expected integers, got {args.learning_seeds!r}")
    plan.warm_start, plan.explore = args.warm_start, args.explore
    plan.click_models = list(CLICK_MODELS) if args.click_model == BOTH else [args.click_model]
    plan.continue_after_click = args.continue_after_click
    plan.learning_impressions, plan.concurrency = args.learning_impressions, args.concurrency
    if args.impressions is not None:
        plan.sensitivity_impressions = args.impressions
    for setting in args.learner:
        key, _, value = setting.partition("=")
        if key not in plan.learner or not value:
            parser.error(
                f"--learner {setting!r}: expected KEY=VALUE, KEY one of {list(plan.learner)}"
            )
        plan.learner[key] = value
    if args.quick:
        plan.sensitivity_impressions, plan.seeds = 240, seeds[:1]
        plan.learning_impressions, plan.validation_users, plan.windows = 240, 100, 2
        plan.learner["min_evidence"] = "20"
    if not 0 <= plan.continue_after_click <= 1:
        parser.error(f"--continue-after-click: a probability, got {plan.continue_after_click}")
    if not seeds or plan.sensitivity_impressions < plan.round_size or plan.learning_impressions < 2:
        parser.error(
            f"need a seed, --impressions >= {plan.round_size} and --learning-impressions >= 2"
        )
    out = args.out or Path("benchmarks/results") / time.strftime("online-%Y%m%d-%H%M%S")
    return plan, out


def main(argv: list[str] | None = None) -> int:
    """Run the online benchmark with a spinner, then print and save the figures."""
    plan, out = parse_plan(argv)
    out.mkdir(parents=True, exist_ok=True)
    results, console = run_with_spinner(lambda advance: run_online(plan, out, advance))
    written = write_all(results, out)
    for line in findings(results):
        console.print(f"  {line}", markup=False)
    console.print(f"\nwritten: {', '.join(str(p) for p in written)}")
    return 0
