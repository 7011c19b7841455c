"""The latent explorer: ``vaelab explore RUN [RUN ...]`` serves a page over finished runs.

Needs the ``explore`` extra (``pip install 'vaelab[explore]'``: Starlette and uvicorn).
"""

from __future__ import annotations

from vaelab.explore.server import (
    MAX_BATCH,
    MAX_BODY,
    MAX_POINTS,
    REQUEST_TIMEOUT,
    Z_BOUND,
    create_app,
    serve,
)

__all__ = ["MAX_BATCH", "MAX_BODY", "MAX_POINTS", "REQUEST_TIMEOUT", "Z_BOUND", "create_app",
           "serve"]
