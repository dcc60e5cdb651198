"""``zreward serve --model DIR``: the reward service RL trainers call from another process or machine.

Listens on ``127.0.0.1`` unless told otherwise; any other address needs a bearer token (``--token-file``, or the
``ZREWARD_SERVE_TOKEN`` environment variable), so the model is never open to a whole network by accident.
Requests are micro-batched (``--max-batch`` images or ``--max-wait-ms``, one forward per batch) behind a
queue bounded by ``--max-queue`` images; a request of many images shares the batches round-robin with the
requests after it, and one whose client has gone is dropped. Prompts above ``--max-prompt-tokens`` are refused
before they are queued. SIGTERM / Ctrl-C stop accepting connections and finish the requests
already received (up to ``--shutdown-timeout`` seconds). The endpoints are in ``zreward.deploy.service``.
"""
from __future__ import annotations

import ipaddress
import os
import socket
import sys
import threading
import time
from pathlib import Path

from zreward.deploy.engine import Scoring
from zreward.deploy.score import add_scoring_arguments, scorer_from_args
from zreward.scoring.rubric import DIMENSIONS

TOKEN_ENV = "ZREWARD_SERVE_TOKEN"
DEFAULT_PORT = 8321
# The longest prompt accepted unless --max-prompt-tokens says otherwise: text-to-image models read at most 512
# prompt tokens themselves (FLUX.1's T5 encoder 512, Stable Diffusion 3's 256, CLIP-based ones 77), so a longer
# "prompt" is not one an image was generated from, while its forward would hold the model for seconds.
PROMPT_TOKENS_CAP = 512


def read_token(token_file=None) -> str | None:
    """The bearer token: the first line of ``token_file``, else ``$ZREWARD_SERVE_TOKEN``, else None."""
    token = Path(token_file).read_text().strip() if token_file else os.environ.get(TOKEN_ENV, "").strip()
    if token_file and not token:
        raise ValueError(f"token file {token_file} is empty")
    return token or None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free port, read it with ``getsockname``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    return sock


def _server(app, log_level: str, shutdown_timeout: float):
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=shutdown_timeout))


class BackgroundServer:
    """The service ``app`` served from a thread of this process, for embedding in a trainer and for tests::

        with BackgroundServer(create_app(scorer)) as server:
            RewardClient(server.url).score(images, prompts)

    Leaving the block shuts down gracefully (queued requests are finished).
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 shutdown_timeout: float = 30.0):
        self._socket = bind(host, port)
        self.host, self.port = self._socket.getsockname()[:2]
        self.url = f"http://{host if ':' not in host else f'[{host}]'}:{self.port}"
        self._server = _server(app, log_level, shutdown_timeout)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        name="zreward-serve", daemon=True)

    def start(self, timeout: float = 30.0) -> "BackgroundServer":
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the reward service did not start on {self.url}")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 60.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)
        self._socket.close()

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def run(args) -> int:
    try:
        from zreward.deploy.service import ServeSettings, create_app
    except ImportError as error:
        raise SystemExit(f"zreward serve needs FastAPI and uvicorn: pip install 'zreward[serve]' ({error})") from None
    try:
        token = read_token(args.token_file)
        if token is None and not is_loopback(args.host):
            raise ValueError(f"--host {args.host} is reachable from other machines: set a bearer token with "
                             f"--token-file or ${TOKEN_ENV}")
        settings = ServeSettings(
            max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue_images=args.max_queue,
            max_request_images=args.max_request_images, max_request_bytes=int(args.max_request_mb * 2**20),
            max_image_pixels=args.max_image_pixels, max_prompt_tokens=args.max_prompt_tokens,
            scoring=Scoring(tuple(args.dimension or DIMENSIONS), args.aggregation, args.weights))
        scorer = scorer_from_args(args)
        app = create_app(scorer, settings, token)
        sock = bind(args.host, args.port)
    except (OSError, ValueError) as error:
        raise SystemExit(f"zreward serve: {error}") from None
    port = sock.getsockname()[1]
    print(f"zreward serve: {args.model} on http://{args.host}:{port} "
          f"({'bearer token required' if token else 'no token'}; prompts up to "
          f"{app.state.settings.max_prompt_tokens} tokens)", file=sys.stderr, flush=True)
    _server(app, args.log_level, args.shutdown_timeout).run(sockets=[sock])
    return 0


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("serve", help="HTTP reward service with request micro-batching",
                                   description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path, help="model folder (zreward_model.json + weights)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}; 0 picks a free one")
    parser.add_argument("--token-file", type=Path, help=f"bearer token file (else ${TOKEN_ENV}; none: no auth)")
    parser.add_argument("--max-batch", type=int, default=16, help="images per forward pass")
    parser.add_argument("--max-wait-ms", type=float, default=10.0, help="longest wait for a batch to fill")
    parser.add_argument("--max-queue", type=int, default=64, help="queued images beyond which requests get 503")
    parser.add_argument("--max-request-images", type=int, default=64)
    parser.add_argument("--max-request-mb", type=float, default=64.0, help="largest request body, MiB")
    parser.add_argument("--max-image-pixels", type=int, default=2048 * 2048)
    parser.add_argument("--max-prompt-tokens", type=int,
                        help="longest prompt in tokens (default: what the model's context leaves, capped at "
                             f"{PROMPT_TOKENS_CAP}, the most that text-to-image models read)")
    parser.add_argument("--shutdown-timeout", type=float, default=30.0,
                        help="seconds to finish received requests on shutdown")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    add_scoring_arguments(parser)
    parser.set_defaults(run=run)
