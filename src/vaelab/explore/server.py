"""The latent explorer's server: a small Starlette app over one or more finished runs.

``create_app(run_paths)`` loads the runs (models on the CPU, in eval mode) and the test split of
each run's data set, and answers a JSON API that the page (``static/``) calls:

=====================================  ===================================================
``GET  /api/runs``                     the runs: kind, latent size, data set, limits
``GET  /api/runs/{i}/points``          posterior means of (up to 5000) test images + labels
``POST /api/runs/{i}/decode``          ``{z, y?}`` -> one image
``POST /api/runs/{i}/decode_batch``    ``{zs, y?}``, ``{zs, ys}`` or ``{z, ys}`` -> images
``POST /api/runs/{i}/encode``          ``{image: 28x28 in [0, 1], y?}`` -> mean, sigma, recon
``POST /api/runs/{i}/posterior``       ``{image, y?}`` -> the true p(z|x) on a grid (latent 2)
``GET  /api/runs/{i}/test_image/{k}``  test image ``k`` and its label
=====================================  ===================================================

Images go out as base64 of 28 x 28 uint8 bytes (row major): the decoder's Bernoulli means
``sigmoid(logits)`` times 255. Every input is checked before it reaches a model: ``z`` is a list
of exactly ``latent_dim`` finite numbers with ``|z_j| <= Z_BOUND``; a class is an integer
0-9, required for a CVAE and refused for a VAE; an image is 28 lists of 28 numbers in [0, 1];
batches hold at most ``MAX_BATCH`` rows; bodies are JSON objects of at most ``MAX_BODY`` bytes
sent as ``application/json``, without NaN, Infinity, overflowing or 20-digit numbers. A bad
request gets a 4xx answer ``{"error": message}``. The page and its two assets are served from a
fixed list; no path a client names is ever opened.

A request must arrive whole within ``REQUEST_TIMEOUT`` seconds of the connection's opening (or of
the previous response): a client that sends half a request and waits (a slow-loris hold) gets a
408 and is disconnected. uvicorn has its own timer only for a connection idle after a response
(``timeout_keep_alive``), which any byte received cancels, and none for headers or bodies; so
the server runs uvicorn's h11 protocol with one more timer (``_TimedH11Protocol``). A request
that carries both ``Content-Length`` and ``Transfer-Encoding`` (two answers to where its body
ends: the way requests are smuggled past proxies) is refused with a 400 and the connection
closed.

One lock serialises every model call (the models are shared, and a CPU has few cores to give),
and each call runs under ``torch.inference_mode`` in a worker thread.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import os
import socket
import sys
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vaelab.checkpoint import load_run
from vaelab.errors import VaelabError
from vaelab.models import ConvVAE

__all__ = ["MAX_BATCH", "MAX_BODY", "MAX_POINTS", "REQUEST_TIMEOUT", "Z_BOUND", "create_app",
           "serve"]

log = logging.getLogger("vaelab.explore")

MAX_BODY = 64 * 1024
"""Largest request body accepted, in bytes (a 28 x 28 image as JSON is about 5 KiB)."""
Z_BOUND = 10.0
"""Largest ``|z_j|`` accepted: the prior N(0, I) puts nothing out there."""
MAX_BATCH = 64
"""Most rows in one ``decode_batch``."""
MAX_POINTS = 5000
"""Most test images encoded for the scatter."""
MAX_DIGITS = 20
"""Longest integer literal accepted in a body (longer ones are refused before conversion)."""
REQUEST_TIMEOUT = 5.0
"""Seconds a client has to send one whole request (headers and body), counted from the
connection's opening or the end of the previous response; a slower one is disconnected."""
KEEP_ALIVE = 5
"""Seconds an idle keep-alive connection is kept after a response (uvicorn's own setting)."""
MAX_HEADER = 16 * 1024
"""Most bytes of a request head that are buffered while its end has not arrived (uvicorn's
``h11_max_incomplete_event_size``); past that the request gets a 400 and the connection is
closed. A longer head that arrives whole is parsed."""
ENCODE_BATCH = 500
POSTERIOR_INTERVALS = 48
"""Intervals per axis of the grid ``posterior`` evaluates p(z|x) on ((n + 1)^2 nodes)."""

STATIC = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
"""The only files the server hands out, with their content types."""

SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cache-control", b"no-store"),
]
PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
JSON_NAMES = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
              int: "a number", float: "a number", type(None): "null"}


class ApiError(Exception):
    """A request the API refuses: answered ``status`` with ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------
def _json_name(value: Any) -> str:
    return JSON_NAMES.get(type(value), type(value).__name__)


def _short(text: str, n: int = 40) -> str:
    text = text if len(text) <= n else text[:n] + "..."
    return json.dumps(text)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _refuse_constant(name: str) -> Any:
    raise ApiError(400, f"invalid JSON: {name} is not a number JSON allows (numbers must be "
                   "finite)")


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ApiError(400, f"invalid JSON: the number {_short(text, 20)} overflows a float")
    return value


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_DIGITS:
        raise ApiError(400, f"invalid JSON: an integer of {len(text)} digits is too large")
    return int(text)


def parse_json(body: bytes) -> Any:
    """Strict JSON: UTF-8, no NaN/Infinity, no overflowing floats, no huge integers."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "invalid JSON: the body is not UTF-8 text") from None
    try:
        return json.loads(text, parse_constant=_refuse_constant, parse_float=_parse_float,
                          parse_int=_parse_int)
    except RecursionError:
        raise ApiError(400, "invalid JSON: nested too deeply") from None
    except ValueError as e:
        raise ApiError(400, f"invalid JSON: {e}") from None


async def read_json(request: Request) -> dict[str, Any]:
    """The request's body as a JSON object, after checking its type and size."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise ApiError(415, "send the body as JSON, with Content-Type: application/json")
    length = request.headers.get("content-length")
    if length is not None:
        length = length.strip()
        if not (length.isascii() and length.isdigit()):
            raise ApiError(400, "Content-Length is not a whole number")
        if len(length) > 12 or int(length) > MAX_BODY:
            raise ApiError(413, f"the body is larger than {MAX_BODY} bytes")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY:
                raise ApiError(413, f"the body is larger than {MAX_BODY} bytes")
    except ClientDisconnect:
        raise ApiError(400, "the client went away before sending the whole body") from None
    if not body:
        raise ApiError(400, "the body is empty: send a JSON object")
    value = parse_json(bytes(body))
    if not isinstance(value, dict):
        raise ApiError(400, f"the body must be a JSON object, not {_json_name(value)}")
    return value


def check_fields(body: dict[str, Any], allowed: Sequence[str]) -> None:
    unknown = [k for k in body if k not in allowed]
    if unknown:
        names = ", ".join(_short(k) for k in unknown[:3]) + (", ..." if len(unknown) > 3 else "")
        raise ApiError(400, f"unknown field(s) {names}: this endpoint takes "
                       f"{', '.join(allowed)}")


def parse_z(value: Any, dim: int, name: str = "z") -> list[float]:
    """A list of exactly ``dim`` finite numbers, each within +-Z_BOUND."""
    if not isinstance(value, list):
        raise ApiError(400, f"{name} must be an array of {dim} numbers, not {_json_name(value)}")
    if len(value) != dim:
        raise ApiError(400, f"{name} must hold exactly {dim} numbers (the latent size), "
                       f"got {len(value)}")
    for j, v in enumerate(value):
        if not _is_number(v):
            raise ApiError(400, f"{name}[{j}] must be a number, not {_json_name(v)}")
        if not (math.isfinite(v) and -Z_BOUND <= v <= Z_BOUND):
            raise ApiError(400, f"{name}[{j}] must lie within +-{Z_BOUND:g}")
    return [float(v) for v in value]


def parse_label(value: Any, num_classes: int, name: str = "y") -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ApiError(400, f"{name} must be an integer class 0-{num_classes - 1}, "
                       f"not {_json_name(value)}")
    if not 0 <= value < num_classes:
        raise ApiError(400, f"{name} must be a class 0-{num_classes - 1}, got {value}")
    return value


def parse_list(value: Any, name: str, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise ApiError(400, f"{name} must be an array of {what}, not {_json_name(value)}")
    if not 1 <= len(value) <= MAX_BATCH:
        raise ApiError(400, f"{name} must hold 1 to {MAX_BATCH} {what}, got {len(value)}")
    return value


def parse_image(value: Any, size: int) -> list[list[float]]:
    """``size`` rows of ``size`` numbers in [0, 1] (0 black, 1 white, as MNIST)."""
    shape = f"{size} arrays of {size} numbers in [0, 1]"
    if not isinstance(value, list):
        raise ApiError(400, f"image must be {shape}, not {_json_name(value)}")
    if len(value) != size:
        raise ApiError(400, f"image must hold exactly {size} rows, got {len(value)}")
    for r, row in enumerate(value):
        if not isinstance(row, list):
            raise ApiError(400, f"image[{r}] must be an array of {size} numbers, "
                           f"not {_json_name(row)}")
        if len(row) != size:
            raise ApiError(400, f"image[{r}] must hold exactly {size} numbers, got {len(row)}")
        for c, v in enumerate(row):
            if not _is_number(v):
                raise ApiError(400, f"image[{r}][{c}] must be a number, not {_json_name(v)}")
            if not 0 <= v <= 1:
                raise ApiError(400, f"image[{r}][{c}] must lie in [0, 1], got {v}")
    return value


def parse_index(text: str, count: int, what: str) -> int:
    if not (text.isascii() and text.isdigit()) or len(text) > 12 or int(text) >= count:
        have = f"0-{count - 1}" if count else "none"
        raise ApiError(404, f"no {what} {_short(text, 20)} (there are {count}: {have})")
    return int(text)


# --------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------
@dataclass(eq=False)
class ExplorerRun:
    """One run as the explorer holds it: the model, its test split and the encoded scatter."""

    index: int
    path: Path
    model: ConvVAE
    config: dict[str, Any]
    summary: dict[str, Any]
    images: torch.Tensor | None = None  # uint8 [N, 28, 28]
    labels: torch.Tensor | None = None  # int64 [N]
    data_error: str | None = None
    points: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def conditional(self) -> bool:
        return bool(self.model.conditional)

    @property
    def latent_dim(self) -> int:
        return int(self.model.latent_dim)

    @property
    def num_classes(self) -> int:
        return int(self.model.spec.num_classes)

    @property
    def image_size(self) -> int:
        return int(self.model.spec.image_size)

    @property
    def test_size(self) -> int:
        return 0 if self.images is None else int(self.images.shape[0])

    @property
    def likelihood(self) -> str:
        """The decoder's likelihood the run was trained with (its config's ``likelihood``)."""
        value = _dict(_dict(self.config).get("config")).get("likelihood", "bernoulli")
        return value if isinstance(value, str) else "bernoulli"

    def describe(self) -> dict[str, Any]:
        cfg = _dict(_dict(self.config).get("config"))
        test = _dict(_dict(self.summary).get("test"))
        dataset = cfg.get("dataset")
        return {
            "index": self.index, "name": self.path.name, "path": str(self.path),
            "kind": self.model.spec.kind, "conditional": self.conditional,
            "latent_dim": self.latent_dim, "num_classes": self.num_classes,
            "image_size": self.image_size,
            "dataset": dataset if isinstance(dataset, str) else None,
            "test_size": self.test_size, "points": min(self.test_size, MAX_POINTS),
            "data_error": self.data_error,
            # only finite numbers: a JSON response may not hold NaN (a hand-edited summary)
            "test": {k: float(v) for k, v in test.items()
                     if k in ("recon", "kl", "neg_elbo") and _is_number(v) and math.isfinite(v)},
        }


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _load_test_split(
    cfg: Any, cache: dict[tuple, Any]
) -> tuple[torch.Tensor | None, torch.Tensor | None, str | None]:
    """The test split named by a run's config (shared between runs), or why it is missing."""
    from vaelab.data import load_dataset

    try:
        key = (str(cfg["dataset"]), int(cfg["val_size"]),
               None if cfg.get("limit") is None else int(cfg["limit"]),
               str(cfg.get("binarize", "none")))
    except (KeyError, TypeError, ValueError):
        return None, None, "the run's config.json names no data set"
    if key not in cache:
        try:
            ds = load_dataset(key[0], val_size=key[1], limit=key[2], fetch=False,
                              binarize=key[3])
            cache[key] = (ds.test.images.contiguous(), ds.test.labels.contiguous(), None)
        except VaelabError as e:
            cache[key] = (None, None, f"the test set is unavailable: {e}")
    return cache[key]


def load_runs(run_paths: Sequence[str | os.PathLike]) -> list[ExplorerRun]:
    if not run_paths:
        raise VaelabError("give at least one run folder to explore")
    runs: list[ExplorerRun] = []
    cache: dict[tuple, Any] = {}
    for i, path in enumerate(run_paths):
        run = load_run(path, device="cpu")
        images, labels, error = _load_test_split(_dict(_dict(run.config).get("config")), cache)
        runs.append(ExplorerRun(i, Path(path), run.model.eval(), run.config, run.summary,
                                images, labels, error))
    return runs


def _to_b64(probs: torch.Tensor) -> list[str]:
    """[B, H, W] probabilities -> base64 strings of uint8 bytes, row major."""
    probs = torch.nan_to_num(probs.float(), nan=0.0)
    pixels = (probs.clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    return [base64.b64encode(p.numpy().tobytes()).decode("ascii") for p in pixels]


def _finite(t: torch.Tensor) -> torch.Tensor:
    """A broken model's NaN or inf as 0 or +-1e6: a JSON answer cannot carry them."""
    return torch.nan_to_num(t.float(), nan=0.0, posinf=1e6, neginf=-1e6)


def _decode(run: ExplorerRun, zs: list[list[float]], ys: list[int] | None) -> list[str]:
    z = torch.tensor(zs, dtype=torch.float32)
    y = torch.tensor(ys, dtype=torch.long) if ys is not None else None
    return _to_b64(torch.sigmoid(run.model.decode(z, y)).squeeze(1))


def _encode(run: ExplorerRun, image: list[list[float]], y: int | None) -> dict[str, Any]:
    x = torch.tensor(image, dtype=torch.float32).view(1, 1, run.image_size, run.image_size)
    yt = torch.tensor([y], dtype=torch.long) if y is not None else None
    mu, logvar = run.model.encode(x, yt)
    mu = _finite(mu)
    sigma = torch.exp(0.5 * _finite(logvar).clamp(-30, 30))
    recon = _to_b64(torch.sigmoid(run.model.decode(mu, yt)).squeeze(1))[0]
    return {"mu": [round(float(v), 5) for v in mu[0]],
            "sigma": [round(float(v), 5) for v in sigma[0]], "recon": recon}


def _number(value: float, digits: int = 6) -> float:
    """A float for JSON: finite (NaN as 0, +-inf as +-1e6) and rounded to ``digits`` places."""
    value = float(value)
    if math.isnan(value):
        return 0.0
    return round(max(-1e6, min(1e6, value)), digits)


def _posterior(run: ExplorerRun, image: list[list[float]], y: int | None) -> dict[str, Any]:
    """The true posterior p(z|x) of one image on a grid, by ``evaluate.posterior_pictures``.

    ``density[i][j]`` is p(z|x) at ``(z1[i], z2[j])`` divided by its largest value and rounded
    to 4 decimals (what a heat map needs); ``density_scale`` is that largest value, so
    ``density * density_scale`` is p(z|x) itself, per unit area of z. Every number is finite.
    """
    from vaelab.data import Split
    from vaelab.evaluate import posterior_pictures

    t = torch.tensor(image, dtype=torch.float32).view(1, run.image_size, run.image_size)
    yt = None if y is None else torch.tensor([y])
    mu, logvar = run.model.encode(t.unsqueeze(1), yt)
    if not (torch.isfinite(mu).all() and torch.isfinite(logvar).all()
            and torch.isfinite(run.model.decode(mu, yt)).all()):
        # a broken model (NaN weights): the quadrature would have no box to integrate over
        raise ApiError(400, f"run {run.index}'s model gives non-finite values for this image: "
                       "its true posterior cannot be computed")
    split = Split((t * 255).round().to(torch.uint8), torch.tensor([0 if y is None else y]))
    pic = posterior_pictures(run.model, split, [0], intervals=POSTERIOR_INTERVALS,
                             likelihood=run.likelihood)[0]
    density = _finite(pic.density).clamp_min(0)
    peak = float(density.max()) if density.numel() else 0.0
    scaled = density / peak if peak > 0 else density
    return {
        "z1": [_number(v, 5) for v in _finite(pic.z1).tolist()],
        "z2": [_number(v, 5) for v in _finite(pic.z2).tolist()],
        "density": [[round(v, 4) for v in row] for row in scaled.tolist()],
        "density_scale": float(f"{peak:.6g}"),
        "log_px": _number(pic.log_px, 4), "log_px_error": _number(pic.log_px_error, 4),
        "elbo": _number(pic.elbo, 4), "kl": _number(pic.gap, 4),
        "mu": [_number(v, 5) for v in _finite(pic.q_mu).tolist()],
        "sigma": [_number(v, 5) for v in _finite(pic.q_sd).tolist()],
    }


def _points(run: ExplorerRun) -> dict[str, Any]:
    if run.points is None:
        assert run.images is not None and run.labels is not None
        n = min(run.test_size, MAX_POINTS)
        labels = run.labels[:n]
        mus = []
        for start in range(0, n, ENCODE_BATCH):
            x = run.images[start:start + ENCODE_BATCH].float().div_(255).unsqueeze(1)
            y = labels[start:start + ENCODE_BATCH] if run.conditional else None
            mus.append(run.model.encode(x, y)[0])
        mu = _finite(torch.cat(mus)) if mus else torch.zeros(0, run.latent_dim)
        run.points = {
            "n": n, "test_size": run.test_size, "latent_dim": run.latent_dim,
            "labels": [int(v) for v in labels],
            "mu": [[round(float(v), 4) for v in row] for row in mu.tolist()],
        }
    return run.points


# --------------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------------
def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class _SecurityHeaders:
    """Adds ``SECURITY_HEADERS`` to every response (pure ASGI: no body buffering)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []),
                                                  *SECURITY_HEADERS]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class _OneBodyFraming:
    """Refuses a request with both Content-Length and Transfer-Encoding (400, then closed).

    RFC 9112 section 6.1 lets a server refuse such a request and says it must close the
    connection after answering: the two headers disagree on where the body ends, so whatever
    follows on the connection cannot be trusted to be the next request.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            names = {name.lower() for name, _ in scope["headers"]}
            if {b"content-length", b"transfer-encoding"} <= names:
                response = _error(400, "a request may not carry both Content-Length and "
                                  "Transfer-Encoding", headers={"connection": "close"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


Handler = Callable[[Request], Awaitable[Response]]


class Explorer:
    """The API's handlers over a list of runs, with the lock that guards the models."""

    def __init__(self, runs: list[ExplorerRun]) -> None:
        self.runs = runs
        self.lock = threading.Lock()
        package = resources.files("vaelab.explore") / "static"
        self.static = {name: (package / name).read_bytes() for name in STATIC}

    # -- plumbing ------------------------------------------------------------------------
    async def compute(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` in a worker thread, holding the lock, under inference mode."""

        def locked() -> Any:
            with self.lock, torch.inference_mode():
                return fn(*args)

        return await run_in_threadpool(locked)

    def warm(self) -> None:
        """Encode every run's scatter now, so the page's first look is quick."""
        for run in self.runs:
            if run.images is not None:
                with self.lock, torch.inference_mode():
                    _points(run)

    def run_of(self, request: Request) -> ExplorerRun:
        return self.runs[parse_index(request.path_params["run"], len(self.runs), "run")]

    @staticmethod
    def api(handler: Handler) -> Handler:
        """Answer ``ApiError`` and ``VaelabError`` as 4xx JSON; anything else is a bug (500)."""

        async def endpoint(request: Request) -> Response:
            try:
                return await handler(request)
            except ApiError as e:
                return _error(e.status, e.message)
            except VaelabError as e:
                return _error(400, str(e))
            except Exception:  # noqa: BLE001 - logged with its traceback, answered as JSON
                log.exception("explorer: %s %s failed", request.method, request.url.path)
                return _error(500, "internal error (the server's log has the details)")

        return endpoint

    def conditioning(self, run: ExplorerRun, body: dict[str, Any]) -> int | None:
        """The class ``y``: required for a CVAE, refused for a VAE."""
        if not run.conditional:
            if "y" in body or "ys" in body:
                raise ApiError(400, f"run {run.index} is a VAE: it takes no class")
            return None
        if "y" not in body:
            raise ApiError(400, f"run {run.index} is a CVAE: give the class y, an integer "
                           f"0-{run.num_classes - 1}")
        return parse_label(body["y"], run.num_classes)

    # -- pages ---------------------------------------------------------------------------
    async def page(self, request: Request) -> Response:
        return self.asset("index.html")

    async def static_file(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name == "index.html" or name not in STATIC:
            raise ApiError(404, f"no such file {_short(name)}")
        return self.asset(name)

    def asset(self, name: str) -> Response:
        headers = {"content-security-policy": PAGE_CSP} if name == "index.html" else None
        return Response(self.static[name], media_type=STATIC[name], headers=headers)

    # -- API -----------------------------------------------------------------------------
    async def list_runs(self, request: Request) -> Response:
        return JSONResponse({
            "runs": [run.describe() for run in self.runs],
            "limits": {"z_bound": Z_BOUND, "max_batch": MAX_BATCH, "max_body": MAX_BODY,
                       "max_points": MAX_POINTS},
        })

    async def one_run(self, request: Request) -> Response:
        return JSONResponse(self.run_of(request).describe())

    async def points(self, request: Request) -> Response:
        run = self.run_of(request)
        if run.images is None:
            raise ApiError(404, run.data_error or "this run has no test set")
        return JSONResponse(await self.compute(_points, run))

    async def decode(self, request: Request) -> Response:
        run = self.run_of(request)
        body = await read_json(request)
        check_fields(body, ["z", "y"])
        y = self.conditioning(run, body)
        if "z" not in body:
            raise ApiError(400, f"give z, an array of {run.latent_dim} numbers")
        z = parse_z(body["z"], run.latent_dim)
        images = await self.compute(_decode, run, [z], None if y is None else [y])
        return JSONResponse({"image": images[0], "size": run.image_size})

    async def decode_batch(self, request: Request) -> Response:
        run = self.run_of(request)
        body = await read_json(request)
        check_fields(body, ["zs", "z", "y", "ys"])
        if not run.conditional and ("y" in body or "ys" in body):
            raise ApiError(400, f"run {run.index} is a VAE: it takes no class")
        if ("zs" in body) == ("z" in body) or ("z" in body and "ys" not in body):
            raise ApiError(400, "give either zs (an array of latent vectors) or z with ys "
                           "(one latent vector under several classes)" if run.conditional
                           else "give zs, an array of latent vectors")
        if "zs" in body:
            rows = parse_list(body["zs"], "zs", "latent vectors")
            zs = [parse_z(z, run.latent_dim, f"zs[{i}]") for i, z in enumerate(rows)]
        else:
            zs = [parse_z(body["z"], run.latent_dim)]
        ys: list[int] | None = None
        if run.conditional:
            if ("y" in body) == ("ys" in body):
                raise ApiError(400, f"run {run.index} is a CVAE: give either y (one class for "
                               "every row) or ys (one class per row)")
            if "ys" in body:
                items = parse_list(body["ys"], "ys", "classes")
                ys = [parse_label(v, run.num_classes, f"ys[{i}]") for i, v in enumerate(items)]
                if "z" in body:
                    zs = zs * len(ys)
                elif len(ys) != len(zs):
                    raise ApiError(400, f"zs has {len(zs)} rows but ys has {len(ys)} classes")
            else:
                ys = [parse_label(body["y"], run.num_classes)] * len(zs)
        images = await self.compute(_decode, run, zs, ys)
        return JSONResponse({"images": images, "size": run.image_size})

    async def image_input(
        self, request: Request
    ) -> tuple[ExplorerRun, list[list[float]], int | None]:
        """The run, image and class of an ``encode`` or ``posterior`` request, validated."""
        run = self.run_of(request)
        body = await read_json(request)
        check_fields(body, ["image", "y"])
        y = self.conditioning(run, body)
        if "image" not in body:
            raise ApiError(400, f"give image: {run.image_size} arrays of {run.image_size} "
                           "numbers in [0, 1]")
        return run, parse_image(body["image"], run.image_size), y

    async def encode(self, request: Request) -> Response:
        run, image, y = await self.image_input(request)
        result = await self.compute(_encode, run, image, y)
        return JSONResponse({**result, "size": run.image_size})

    async def posterior(self, request: Request) -> Response:
        """p(z|x) of a digit on a grid, with log p(x), the ELBO and KL(q || p(z|x)).

        Its own endpoint (not part of ``encode``): the quadrature costs a second or more on a
        CPU, so the page asks for it only when the user does.
        """
        run, image, y = await self.image_input(request)
        if run.latent_dim != 2:
            raise ApiError(400, f"the true posterior needs a 2-D latent, this run has "
                           f"{run.latent_dim}")
        result = await self.compute(_posterior, run, image, y)
        return JSONResponse({**result, "size": run.image_size})

    async def test_image(self, request: Request) -> Response:
        run = self.run_of(request)
        if run.images is None or run.labels is None:
            raise ApiError(404, run.data_error or "this run has no test set")
        k = parse_index(request.path_params["index"], run.test_size, "test image")
        pixels = run.images[k].contiguous().numpy().tobytes()
        return JSONResponse({"index": k, "label": int(run.labels[k]),
                             "image": base64.b64encode(pixels).decode("ascii"),
                             "size": run.image_size})


async def _http_error(request: Request, exc: Exception) -> Response:
    """The router's own 404 and 405, as JSON like every other refusal."""
    assert isinstance(exc, HTTPException)
    message = {404: "not found", 405: f"method {request.method} not allowed here"}.get(
        exc.status_code, str(exc.detail))
    return _error(exc.status_code, message, headers=exc.headers)


def create_app(
    run_paths: Sequence[str | os.PathLike], *, allowed_hosts: Sequence[str] | None = None
) -> Starlette:
    """The explorer's ASGI app over ``run_paths`` (loaded now: a bad run fails here).

    ``allowed_hosts`` limits the Host header the app answers (a guard against DNS rebinding
    when it listens on localhost); None answers any.
    """
    explorer = Explorer(load_runs(run_paths))
    api = Explorer.api
    routes = [
        Route("/", api(explorer.page)),
        Route("/index.html", api(explorer.page)),
        Route("/static/{name}", api(explorer.static_file)),
        Route("/api/runs", api(explorer.list_runs)),
        Route("/api/runs/{run}", api(explorer.one_run)),
        Route("/api/runs/{run}/points", api(explorer.points)),
        Route("/api/runs/{run}/decode", api(explorer.decode), methods=["POST"]),
        Route("/api/runs/{run}/decode_batch", api(explorer.decode_batch), methods=["POST"]),
        Route("/api/runs/{run}/encode", api(explorer.encode), methods=["POST"]),
        Route("/api/runs/{run}/posterior", api(explorer.posterior), methods=["POST"]),
        Route("/api/runs/{run}/test_image/{index}", api(explorer.test_image)),
    ]
    middleware = [Middleware(_SecurityHeaders), Middleware(_OneBodyFraming)]
    if allowed_hosts is not None:
        middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts)))
    app = Starlette(routes=routes, middleware=middleware,
                    exception_handlers={HTTPException: _http_error})
    app.router.redirect_slashes = False  # a path either names a route or is a 404
    app.state.explorer = explorer
    return app


# --------------------------------------------------------------------------------------------
# Serving
# --------------------------------------------------------------------------------------------
def _listen(host: str, port: int) -> socket.socket:
    if not 0 <= port <= 65535:
        raise VaelabError(f"--port must be 0-65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise VaelabError(f"cannot listen on {host}: {e.strerror}") from None
    family, _, _, _, address = infos[0]
    # proto must say TCP: asyncio turns Nagle off (TCP_NODELAY) only on sockets that do, and
    # with Nagle on, every response's body waits ~40 ms for the ACK of its headers.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise VaelabError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def _timed_h11_protocol() -> type:
    """uvicorn's h11 protocol with a deadline on each request; see ``_TimedH11Protocol``."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class _TimedH11Protocol(H11Protocol):
        """Closes a connection whose request is not in whole ``REQUEST_TIMEOUT`` s after the
        connection opened or the previous response ended.

        The deadline is not moved by the bytes that do arrive, so a request trickled in one
        byte at a time is cut off as surely as one that stops. A request that is only partly
        in is answered 408 first (if no answer has started); a connection that sent nothing
        is closed silently, as uvicorn closes an idle keep-alive one.
        """

        request_timeout = REQUEST_TIMEOUT
        _deadline: Any = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(self.request_timeout, self._too_slow)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _too_slow(self) -> None:
            self._deadline = None
            if self.transport.is_closing():
                return
            state = self.conn.their_state
            if state not in (h11.IDLE, h11.SEND_BODY):
                return  # the whole request is in: the app is answering it
            if state is h11.IDLE:  # the head is not in: some bytes of it, or none at all
                unanswered = bool(self.conn.trailing_data[0])
            else:  # the head is in, the body is not; the app may have answered already
                unanswered = self.cycle is None or not self.cycle.response_started
            if unanswered:
                body = json.dumps({"error": f"the request did not arrive whole within "
                                            f"{self.request_timeout:g} s"}).encode()
                self.transport.write(
                    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                    b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))
            self.transport.close()

    return _TimedH11Protocol


def server_config(app: ASGIApp) -> Any:
    """The uvicorn settings the explorer is served with (``serve`` and the tests use them)."""
    import uvicorn

    # ws="none": the explorer has no WebSocket route, so no connection leaves the timed
    # protocol for another one
    return uvicorn.Config(app, http=_timed_h11_protocol(), ws="none", log_level="warning",
                          access_log=False, lifespan="off", timeout_keep_alive=KEEP_ALIVE,
                          h11_max_incomplete_event_size=MAX_HEADER)


def _allowed_hosts(host: str) -> list[str] | None:
    """Host names a browser may use to reach a server bound to ``host`` (None: any)."""
    if host in ("", "0.0.0.0", "::") or ":" in host:
        return None
    return sorted({"127.0.0.1", "localhost", host})


def serve(
    run_paths: Sequence[str | os.PathLike], host: str = "127.0.0.1", port: int = 8000,
    *, threads: int | None = None, log_fn: Callable[[str], Any] | None = None,
) -> None:
    """Load the runs, listen on ``host:port`` (0: any free port), print the address, serve.

    Returns when interrupted (Ctrl+C or SIGTERM).
    """
    import uvicorn

    if not 0 <= port <= 65535:
        raise VaelabError(f"--port must be 0-65535, got {port}")
    say = log_fn or (lambda text: print(text, flush=True))
    torch.set_num_threads(threads or max(1, min(2, (os.cpu_count() or 1) // 2)))
    app = create_app(run_paths, allowed_hosts=_allowed_hosts(host))
    explorer: Explorer = app.state.explorer
    for run in explorer.runs:
        note = f"  ({run.data_error})" if run.data_error else ""
        say(f"run {run.index}: {run.path} ({run.model.spec.kind}, latent "
            f"{run.latent_dim}){note}")
    explorer.warm()
    sock = _listen(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    if host in ("0.0.0.0", "::"):
        print("vaelab: warning: the explorer is reachable from other machines", file=sys.stderr)
    say(f"vaelab explorer: http://{shown}:{bound_port}/  (Ctrl+C to stop)")
    try:
        uvicorn.Server(server_config(app)).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shut down cleanly, then re-raised the Ctrl+C
        pass
    finally:
        sock.close()
    say("vaelab explorer: stopped")
