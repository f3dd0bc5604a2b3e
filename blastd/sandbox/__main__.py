"""python -m blastd.sandbox: the Cloud API emulator as its own process, for benchmarks.

The other providers' emulators are mounted on the same port: UltraMsg under /ultramsg,
Wablas under /wablas,
status gateways (Evolution API, the story API) under /status,
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
import asyncio
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
# What each knob does, for --help; probabilities are per request, drawn once (at most one
# fault per request, and together at most 1).
KNOB_HELP = {
    "rate_per_s": "accepted sends a second per phone number id, then 130429 (default 0: no limit)",
    "latency_ms": "delay before every answer, in milliseconds (default 0)",
    "latency_jitter_ms": "extra random delay up to this many milliseconds (default 0)",
    "webhook_delay_ms": "delay before status webhooks are posted, in milliseconds (default 0)",
    "retry_after_s": "Retry-After header sent with throttled answers (default: none)",
    "transient_p": "probability of a transient 5xx answer (default 0)",
    "throttled_p": "probability of a 429 throttled answer (default 0)",
    "pair_limit_p": "probability of the per-recipient pair-rate error 131056 (default 0)",
    "quality_p": "probability of a quality/spam refusal that pauses a campaign (default 0)",
    "permanent_p": "probability of a permanent per-recipient refusal (default 0)",
    "fatal_p": "probability of an account-level refusal that stops a campaign (default 0)",
    "malformed_body_p": "probability of a 200 answer whose body cannot be read (default 0)",
    "seed": "random seed, for repeatable fault draws (default: random)",
    "webhook_batch_max": "statuses per webhook POST at most",
    "webhook_url": "where to POST status webhooks (default: none are sent)",
    "app_secret": "secret that signs webhooks (X-Hub-Signature-256; default sandbox-app-secret)",
    "withhold_answer_p": "probability that a message is accepted and counted but its answer is"
    " held back (default 0)",
    "withhold_answer_ms": "how long a withheld answer is held, in milliseconds (default an hour:"
    " never seen; shorter: a late answer)",
    "webhook_duplicate_p": "probability that a status webhook is posted twice (default 0)",
}
BOOL_KNOBS = ("webhook_reorder", "webhook_omit_callback_data")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Flags for the main knobs; a knob left out keeps SandboxConfig's default."""
    parser = argparse.ArgumentParser(prog="python -m blastd.sandbox", description=__doc__)
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)"
    )
    parser.add_argument(
        "--port", type=int, default=8788, help="port (default 8788; 0 picks a free one)"
    )
    parser.add_argument(
        "--token",
        action="append",
        dest="tokens",
        help="an access token the Cloud API emulator accepts (repeat for several; default "
        "sandbox-token)",
    )
    parser.add_argument(
        "--pair-limit",
        action="store_true",
        default=None,
        help="enforce the per-recipient pair rate (about one message each 6 s, bursts of 45)",
    )
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
            flag = "--" + knob.replace("_", "-")
            parser.add_argument(flag, dest=knob, type=kind, help=KNOB_HELP[knob])
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
    uvloop.run(_serve_until_signalled(config, args.host, args.port))


async def _serve_until_signalled(config: SandboxConfig, host: str, port: int) -> None:
    """Serve until SIGINT (Ctrl-C) or SIGTERM. The loop takes the signals itself, before the
    port is bound, rather than leaving them to a KeyboardInterrupt that must surface while the
    loop waits in C: on a loaded machine a sandbox was seen still serving 30 s after SIGINT."""
    loop = asyncio.get_running_loop()
    serving = asyncio.current_task()
    assert serving is not None  # uvloop.run runs this coroutine as a task
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, serving.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await serve(config, host, port, announce, provider_apps())


if __name__ == "__main__":
    main()
