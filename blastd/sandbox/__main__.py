"""python -m blastd.sandbox: the Cloud API emulator as its own process, for benchmarks.

The other providers' emulators are mounted on the same port: UltraMsg under /ultramsg,
Wablas under /wablas,
status gateways (Evolution API, seed 001's story API) under /status,
D-ID under /did, the generic video-job API under /video.

Fault knobs for the fate of a message: --withhold-answer-p accepts and counts a message, then
holds its answer --withhold-answer-ms (default an hour: never seen; shorter: a late answer);
--webhook-duplicate-p posts a status twice; --webhook-reorder and --webhook-omit-callback-data
change the order and the content of status webhooks. /_sandbox/stats shows "accepted" and
"answers_withheld", the sandbox's own tally.

Prints "sandbox listening on http://HOST:PORT" once bound, so a parent can wait for the line.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from collections.abc import Sequence

import uvloop
from aiohttp import web
from pydantic import ValidationError

from blastd.sandbox.cloud_api import SandboxConfig, serve
from blastd.sandbox.did import DidSandboxConfig, build_did_app
from blastd.sandbox.status_gateway import StatusSandboxConfig, build_status_app
from blastd.sandbox.ultramsg import UltraMsgSandboxConfig, build_ultramsg_app
from blastd.sandbox.video_api import VideoApiSandboxConfig, build_video_api_app
from blastd.sandbox.wablas import build_wablas_app
from blastd.sandbox.wablas_config import WablasSandboxConfig

FLOAT_KNOBS = (
    "rate_per_s",
    "latency_ms",
    "latency_jitter_ms",
    "webhook_delay_ms",
    "retry_after_s",
    "transient_p",
    "throttled_p",
    "pair_limit_p",
    "quality_p",
    "permanent_p",
    "fatal_p",
    "malformed_body_p",
    "withhold_answer_p",
    "withhold_answer_ms",
    "webhook_duplicate_p",
)
INT_KNOBS = ("seed", "webhook_batch_max")
STR_KNOBS = ("webhook_url", "app_secret")
BOOL_KNOBS = ("webhook_reorder", "webhook_omit_callback_data")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Flags for the main knobs; a knob left out keeps SandboxConfig's default."""
    parser = argparse.ArgumentParser(prog="python -m blastd.sandbox", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8788, help="0 picks a free port")
    parser.add_argument("--token", action="append", dest="tokens", help="repeat for several")
    parser.add_argument("--pair-limit", action="store_true", default=None)
    parser.add_argument(
        "--webhook-reorder",
        action="store_true",
        default=None,
        help="queue a message's statuses newest first (read before sent)",
    )
    parser.add_argument(
        "--webhook-omit-callback-data",
        action="store_true",
        default=None,
        help="statuses without biz_opaque_callback_data: matched by message id only",
    )
    for knobs, kind in ((FLOAT_KNOBS, float), (INT_KNOBS, int), (STR_KNOBS, str)):
        for knob in knobs:
            parser.add_argument("--" + knob.replace("_", "-"), dest=knob, type=kind)
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> SandboxConfig:
    """The SandboxConfig the flags describe; raises ValidationError on a bad value."""
    names = (*FLOAT_KNOBS, *INT_KNOBS, *STR_KNOBS, "tokens", "pair_limit", *BOOL_KNOBS)
    given = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    return SandboxConfig.model_validate(given)


def provider_apps() -> dict[str, web.Application]:
    """The other providers' emulators by mount prefix, with default knobs (set at runtime
    through each one's /_sandbox/config)."""
    return {
        "/ultramsg": build_ultramsg_app(UltraMsgSandboxConfig()),
        "/wablas": build_wablas_app(WablasSandboxConfig()),
        "/status": build_status_app(StatusSandboxConfig()),
        "/did": build_did_app(DidSandboxConfig()),
        "/video": build_video_api_app(VideoApiSandboxConfig()),
    }


def announce(base_url: str) -> None:
    """Tell the parent process the port is bound; flushed because stdout is a pipe there."""
    sys.stdout.write(f"sandbox listening on {base_url}\n")
    sys.stdout.flush()


def main(argv: Sequence[str] | None = None) -> None:
    """Serve until interrupted; uvloop because benchmarks push thousands of requests a second."""
    args = parse_args(argv)
    try:
        config = config_from_args(args)
    except ValidationError as exc:
        sys.exit(f"invalid sandbox flags: {exc}")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop on SIGTERM as on Ctrl-C
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(serve(config, args.host, args.port, announce, provider_apps()))


if __name__ == "__main__":
    main()
