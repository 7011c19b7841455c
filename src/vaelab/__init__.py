"""vaelab: Variational Autoencoders on MNIST, from the ELBO up.

The main entry points are here, at the top::

    import vaelab

    result = vaelab.train(vaelab.resolve_config("study", model="vae", epochs=5), "runs/vae5")
    run = vaelab.load_run("runs/vae5")
    print(vaelab.evaluate_elbo(run.model, vaelab.load_dataset("mnist").test))

Each name is imported from its module when first used (``vaelab.training``, ``vaelab.config``,
``vaelab.checkpoint``, ``vaelab.data``, ``vaelab.models``, ``vaelab.evaluate``,
``vaelab.errors``), so ``import vaelab`` stays light and the command line starts fast.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_HOMES = {
    "vaelab.training": ("train", "train_concurrently", "Trainer", "TrainResult", "Interrupted"),
    "vaelab.config": ("TrainConfig", "resolve_config", "PRESETS"),
    "vaelab.checkpoint": ("load_run", "load_model", "Run"),
    "vaelab.data": ("load_dataset", "Dataset", "Split"),
    "vaelab.models": ("ModelSpec", "ConvVAE", "ConvCVAE", "build_model"),
    "vaelab.evaluate": ("evaluate_elbo", "exact_log_px", "exact_log_px_per_image",
                        "log_px_estimate", "full_evaluation"),
    "vaelab.errors": ("VaelabError", "ConfigError", "CheckpointError", "DataError",
                      "NumericalError"),
}
_WHERE = {name: module for module, names in _HOMES.items() for name in names}

__all__ = [
    "PRESETS", "CheckpointError", "ConfigError", "ConvCVAE", "ConvVAE", "DataError", "Dataset",
    "Interrupted", "ModelSpec", "NumericalError", "Run", "Split", "TrainConfig", "TrainResult",
    "Trainer", "VaelabError", "__version__", "build_model", "evaluate_elbo", "exact_log_px",
    "exact_log_px_per_image", "full_evaluation", "load_dataset", "load_model", "load_run",
    "log_px_estimate", "resolve_config", "train", "train_concurrently",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'vaelab' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE})


if TYPE_CHECKING:  # for type checkers and editors: the same names, imported eagerly
    from vaelab.checkpoint import Run, load_model, load_run
    from vaelab.config import PRESETS, TrainConfig, resolve_config
    from vaelab.data import Dataset, Split, load_dataset
    from vaelab.errors import (
        CheckpointError,
        ConfigError,
        DataError,
        NumericalError,
        VaelabError,
    )
    from vaelab.evaluate import (
        evaluate_elbo,
        exact_log_px,
        exact_log_px_per_image,
        full_evaluation,
        log_px_estimate,
    )
    from vaelab.models import ConvCVAE, ConvVAE, ModelSpec, build_model
    from vaelab.training import Interrupted, Trainer, TrainResult, train, train_concurrently
