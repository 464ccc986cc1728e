"""``python -m mock_recommenders``: serve mock recommenders until Ctrl-C.

With no flags, the four standard ones (`sml`, `asc`, `trd`, `psn`) on ports 5001-5004.
``--name NAME [--port PORT]`` serves just one; ``--names a,b,c`` serves any number on
consecutive ports from ``--base-port``. Port 0 (``--port 0``, ``--base-port 0``) serves each on
a free port that the system picks; the line printed for each once it listens gives its URL.
Faults can also be changed on a running mock:
``curl -X PUT localhost:5003/admin/behaviour -d '{"hang": true}'`` (see `behaviour.py`).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from mock_recommenders.behaviour import Behaviour
from mock_recommenders.server import (
    DEFAULT_BASE_PORT,
    DEFAULT_NAMES,
    InFlight,
    Recommender,
    default_port,
    start_site,
    trace_log,
)
from mock_recommenders.world import DEFAULT_SEED, default_world

__all__ = ["main", "parse_arguments", "serve"]


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0 to 65535, not {port}")
    return port


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        prog="python -m mock_recommenders", description="Serve mock recommenders until Ctrl-C."
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    parser.add_argument("--name", help="serve only this recommender")
    parser.add_argument(
        "--port",
        type=_port,
        help="its port (with --name; default: the standard one, 5001-5004; 0: a free one)",
    )
    parser.add_argument(
        "--names",
        default=",".join(DEFAULT_NAMES),
        help="comma-separated names, served on consecutive ports from --base-port",
    )
    parser.add_argument(
        "--base-port",
        type=_port,
        default=DEFAULT_BASE_PORT,
        help="the first port (5001); 0: each on a free port",
    )
    parser.add_argument(
        "--world-seed",
        type=int,
        default=DEFAULT_SEED,
        help=f"the seed of the synthetic world they rank ({DEFAULT_SEED})",
    )
    parser.add_argument("--delay-ms", type=float, default=0.0, help="fixed delay per call")
    parser.add_argument(
        "--jitter-ms", type=float, default=0.0, help="random extra delay, uniform in 0..jitter"
    )
    parser.add_argument(
        "--error-rate", type=float, default=0.0, help="share of calls answered --error-status"
    )
    parser.add_argument("--error-status", type=int, default=503, help="with --error-rate (503)")
    parser.add_argument(
        "--slow-rate", type=float, default=0.0, help="share of calls delayed a further --slow-ms"
    )
    parser.add_argument("--slow-ms", type=float, default=0.0, help="with --slow-rate")
    # Off by default: an access line per call costs the mocks CPU that a benchmark would then
    # charge to the gateway.
    logs = parser.add_mutually_exclusive_group()
    logs.add_argument(
        "--access-log", action="store_true", help="log every request to stderr (costs CPU)"
    )
    logs.add_argument("--quiet", action="store_true", help="no access log (the default)")
    args = parser.parse_args(argv)
    try:
        args.behaviour = Behaviour()
        args.behaviour.update(
            {
                "delay_ms": args.delay_ms,
                "jitter_ms": args.jitter_ms,
                "error_rate": args.error_rate,
                "error_status": args.error_status,
                "slow_rate": args.slow_rate,
                "slow_ms": args.slow_ms,
            }
        )
    except ValueError as exc:
        parser.error(str(exc))
    if args.port is not None and args.name is None:
        parser.error("--port goes with --name; use --base-port for several recommenders")
    free = args.base_port == 0
    if args.name is not None:
        port = args.port
        if port is None:
            port = 0 if free else default_port(args.name, args.base_port)
        if port is None:
            parser.error(f"--name {args.name} is not a standard recommender: give --port")
        args.plan = [(args.name, port)]
    else:
        names = [name.strip() for name in args.names.split(",") if name.strip()]
        if not names or len(set(names)) != len(names):
            parser.error("--names must list distinct names")
        if not free and args.base_port + len(names) - 1 > 65535:
            parser.error("--base-port leaves too few ports for --names")
        args.plan = [(name, 0 if free else args.base_port + i) for i, name in enumerate(names)]
    return args


async def serve(args: argparse.Namespace) -> None:
    """Serve until SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    behaviour: Behaviour = args.behaviour
    if args.access_log:
        _log_access()
    _log_traces()
    recommenders, runners = [], []
    world = default_world(args.world_seed)
    in_flight = InFlight()
    try:
        for name, port in args.plan:
            recommender = Recommender(name, behaviour, world=world, in_flight=in_flight)
            runner, bound = await start_site(recommender, args.host, port, args.access_log)
            recommenders.append(recommender)
            runners.append(runner)
            print(
                f"mock recommender {name} listening on http://{args.host}:{bound}/test", flush=True
            )
        await stop.wait()
    finally:
        for recommender in recommenders:
            recommender.stop()
        for runner in runners:
            await runner.cleanup()


def _log_access() -> None:
    # aiohttp logs access lines at INFO to "aiohttp.access", which goes nowhere until a
    # handler is attached.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(name)s %(message)s"))
    access = logging.getLogger("aiohttp.access")
    access.addHandler(handler)
    access.setLevel(logging.INFO)


def _log_traces() -> None:
    # The traceparent each call brings (`mock_recommenders.server.trace_log`), to stderr.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(name)s %(message)s"))
    trace_log.addHandler(handler)
    trace_log.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    """Run the mock recommenders; exit 0 on Ctrl-C or SIGTERM, 1 if a port cannot be bound."""
    args = parse_arguments(argv)
    try:
        asyncio.run(serve(args))
    except KeyboardInterrupt:
        # Ctrl-C before the signal handlers are installed (during start-up) is still a stop.
        return 0
    except OSError as exc:
        print(f"mock_recommenders: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
