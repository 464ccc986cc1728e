"""The gateway's command line: ``python -m gateway check-config [FILE]``.

`check-config` validates a config as the gateway would load it (the file, then the `GATEWAY_*`
environment overrides), like ``nginx -t``: before a reload (``kill -HUP``), it says whether the
master will accept the file. It prints a one-line summary and exits 0 on a valid config;
otherwise it prints what is wrong, naming each field, and exits 1. With `--probe` it then asks
each recommender's model server whether it is ready, in its protocol
(`gateway.recommenders.readiness`), prints what each answered, and exits 1 if one is not.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from gateway.config.feedback import FeedbackSettings
from gateway.config.settings import Settings, describe_source, load_settings
from gateway.config.store_urls import describe_store_url
from gateway.core.errors import ConfigError
from gateway.recommenders import async_http, readiness

__all__ = ["main", "summary"]


def summary(settings: Settings) -> str:
    """A line saying what `settings` set up: the recommenders and the main choices."""
    names = ", ".join(recommender.name for recommender in settings.recommenders)
    return (
        f"{len(settings.recommenders)} recommenders ({names}), "
        f"deadline_ms {settings.deadline_ms:g}, fusion {settings.fusion}, "
        f"server {settings.server}, strategy {settings.strategy}, "
        f"{_feedback_summary(settings.feedback)}"
    )


def _feedback_summary(feedback: FeedbackSettings) -> str:
    if feedback.store is None:
        return "feedback off"
    arms = feedback.experiments.arms
    total = sum(arm.share for arm in arms)
    split = ", ".join(f"{arm.name} {arm.share / total:.0%} {arm.fusion}" for arm in arms)
    learner = feedback.learner
    learning = "off" if not learner.enabled else "frozen" if learner.frozen else "on"
    return (
        f"feedback {describe_store_url(feedback.store)} ("
        + (f"arms: {split}; " if arms else "no experiment; ")
        + f"learner {learning})"
    )


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    parser = argparse.ArgumentParser(prog="python -m gateway", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser(
        "check-config",
        help="validate a config as the gateway would load it; exit 1 if it is invalid",
    )
    check.add_argument(
        "file",
        nargs="?",
        help="the YAML file (default: $GATEWAY_CONFIG, then the packaged config.yaml)",
    )
    check.add_argument(
        "--probe",
        action="store_true",
        help="then ask each recommender's model server whether it is ready (its protocol's "
        "readiness URL, or ready_url); exit 1 if one is not",
    )
    args = parser.parse_args(argv)

    try:
        settings = load_settings(args.file)
    except ConfigError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 1
    print(f"gateway: config ok: {describe_source(args.file)}: {summary(settings)}")
    if not args.probe:
        return 0
    found = asyncio.run(_probe(settings))
    for recommender in found:
        print(f"  {recommender.name} ({recommender.protocol}): {_state(recommender)}")
    not_ready = readiness.summary(found)
    if not_ready:
        print(f"gateway: recommenders not ready: {not_ready}", file=sys.stderr)
        return 1
    return 0


async def _probe(settings: Settings) -> list[readiness.RecommenderReadiness]:
    async with async_http.open_session(settings.pool, "fusion-gateway/check-config") as session:
        return await readiness.probe(
            session, settings.recommenders, settings.readiness.timeout_ms / 1000
        )


def _state(recommender: readiness.RecommenderReadiness) -> str:
    if not recommender.probed:
        return "not asked (no readiness URL: give ready_url)"
    said = "; ".join(replica.describe() for replica in recommender.replicas)
    return f"{'ready' if recommender.ready else 'NOT READY'} ({said})"


if __name__ == "__main__":
    sys.exit(main())
