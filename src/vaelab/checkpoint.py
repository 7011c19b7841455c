"""Run folders and checkpoints: the one place that writes and reads model files.

A run folder::

    config.json        the resolved TrainConfig, model spec, versions, seed
    metrics.jsonl      one JSON line per finished epoch (rewritten atomically each epoch)
    checkpoints/step-00001290/
        model.safetensors   weights (data, never code)
        state.pt            optimiser, schedule, RNG, epoch, step, metrics (weights_only load)
        manifest.json       step, epoch, model spec, SHA-256 of the two files above
    model.safetensors  final weights        model.json  spec + SHA-256 of the weights
    summary.json       final test metrics

A checkpoint folder is written under a temporary name and renamed into place, so it is either
whole or absent; its manifest's checksums catch truncation and bit flips afterwards.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from vaelab.config import TrainConfig
from vaelab.errors import CheckpointError, SpecMismatch, VaelabError
from vaelab.io import (
    _fsync_dir,
    atomic_write_bytes,
    atomic_write_json,
    process_umask,
    sha256_file,
    write_error,
)
from vaelab.models import ConvVAE, ModelSpec, build_model

CHECKPOINT_DIR = "checkpoints"
KEEP_CHECKPOINTS = 2
FORMAT_VERSION = 1


def weights_bytes(model: torch.nn.Module, spec: ModelSpec) -> bytes:
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    return st_save(tensors, metadata={"vaelab_spec": json.dumps(spec.to_dict())})


def _describe(spec: ModelSpec) -> str:
    return f"a {spec.kind} (latent {spec.latent_dim}, channels {list(spec.channels)}, " \
        f"hidden {spec.enc_hidden}/{spec.dec_hidden})"


def check_spec(found: ModelSpec, expected: ModelSpec | None, where: Path) -> None:
    if expected is not None and found != expected:
        a, b = found.to_dict(), expected.to_dict()
        differ = "; ".join(f"{k} {a[k]}, not {b[k]}" for k in a if a[k] != b[k])
        raise SpecMismatch(f"{where} holds {_describe(found)}, but {_describe(expected)} "
                           f"was expected ({differ})")


def load_weights(model: torch.nn.Module, data: bytes, where: Path) -> None:
    """Load safetensors bytes into ``model``; any mismatch is a CheckpointError naming ``where``."""
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{where}: not a readable safetensors file ({e})") from None
    own = model.state_dict()
    if set(tensors) != set(own):
        raise CheckpointError(f"{where}: its tensors do not match the model's")
    for k, v in tensors.items():
        if v.shape != own[k].shape:
            raise CheckpointError(
                f"{where}: tensor {k} has shape {list(v.shape)}, model has {list(own[k].shape)}"
            )
    model.load_state_dict(tensors)


def weights_spec(data: bytes) -> ModelSpec | None:
    """The model spec a safetensors file records in its header (None if it records none)."""
    try:
        n = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8:8 + n])["__metadata__"]
        return ModelSpec.from_dict(json.loads(meta["vaelab_spec"]))
    except Exception:  # noqa: BLE001 - no readable spec; the checksum and load judge the file
        return None


def _verified_bytes(path: Path, expected_sha: str, where: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{where}: cannot read {path.name} ({e.strerror})") from None
    if hashlib.sha256(data).hexdigest() != expected_sha:
        raise CheckpointError(f"{where}: {path.name} fails its checksum (truncated or altered)")
    return data


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------
def save_checkpoint(
    run_dir: Path, model: torch.nn.Module | bytes, spec: ModelSpec, state: dict[str, Any],
    *, step: int, epoch: int, keep: int = KEEP_CHECKPOINTS, protect: int | None = None,
) -> Path:
    """Write checkpoint ``step-<step>`` atomically and keep only the newest ``keep``, and the
    one of step ``protect`` (early stopping's best epoch) wherever it is.

    ``model`` is the module, or its ``weights_bytes`` taken earlier (a snapshot written later).
    """
    root = Path(run_dir) / CHECKPOINT_DIR
    final = root / checkpoint_name(step)
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
        os.chmod(tmp, 0o777 & ~process_umask())  # mkdtemp's 0700 would ignore the umask
    except OSError as e:
        raise write_error(e, final, what=f"checkpoint {final}",
                          kept="the previous checkpoints are kept") from e
    try:
        weights = model if isinstance(model, bytes) else weights_bytes(model, spec)
        atomic_write_bytes(tmp / "model.safetensors", weights)
        buf = io.BytesIO()
        torch.save(state, buf)
        atomic_write_bytes(tmp / "state.pt", buf.getvalue())
        manifest = {
            "format": FORMAT_VERSION, "step": step, "epoch": epoch, "spec": spec.to_dict(),
            "files": {n: sha256_file(tmp / n) for n in ("model.safetensors", "state.pt")},
        }
        atomic_write_json(tmp / "manifest.json", manifest)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise write_error(e, final, what=f"checkpoint {final}",
                              kept="the previous checkpoints are kept") from e
        raise
    kept = None if protect is None else checkpoint_name(protect)
    for old in list_checkpoints(run_dir)[keep:]:
        if old.name != kept:
            shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoint_name(step: int) -> str:
    """The folder name of the checkpoint taken after ``step`` optimisation steps."""
    return f"step-{step:08d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint folders of a run, newest first (temporary folders are ignored)."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    return sorted((p for p in root.glob("step-*") if p.is_dir()), reverse=True)


@dataclass
class Checkpoint:
    path: Path
    step: int
    epoch: int
    spec: ModelSpec
    weights: bytes
    state: dict[str, Any]


def read_checkpoint(path: Path, expected: ModelSpec | None = None) -> Checkpoint:
    """Read and verify one checkpoint folder; CheckpointError if anything is off."""
    path = Path(path)
    try:
        manifest = json.loads((path / "manifest.json").read_text())
        files = {n: str(manifest["files"][n]) for n in ("model.safetensors", "state.pt")}
        spec = ModelSpec.from_dict(manifest["spec"])
        step, epoch = int(manifest["step"]), int(manifest["epoch"])
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no manifest.json (incomplete checkpoint)") from None
    except (ValueError, KeyError, TypeError, VaelabError) as e:  # VaelabError: a bad spec
        raise CheckpointError(f"{path}: manifest.json is corrupted ({e})") from None
    check_spec(spec, expected, path)
    weights = _verified_bytes(path / "model.safetensors", files["model.safetensors"], path)
    raw = _verified_bytes(path / "state.pt", files["state.pt"], path)
    try:
        state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        raise CheckpointError(f"{path}: state.pt cannot be loaded safely ({e})") from None
    return Checkpoint(path, step, epoch, spec, weights, state)


def latest_checkpoint(
    run_dir: Path, expected: ModelSpec | None = None
) -> tuple[Checkpoint | None, list[str]]:
    """The newest checkpoint that verifies, and a message for each newer one refused.

    A checkpoint of the wrong model kind or shape is not skipped: it raises, since falling back
    would hide a mix-up of runs.
    """
    refused: list[str] = []
    for path in list_checkpoints(run_dir):
        try:
            return read_checkpoint(path, expected), refused
        except SpecMismatch:
            raise
        except CheckpointError as e:
            refused.append(str(e))
    return None, refused


# --------------------------------------------------------------------------------------------
# Final weights and whole runs
# --------------------------------------------------------------------------------------------
def save_final(run_dir: Path, model: torch.nn.Module, spec: ModelSpec) -> None:
    data = weights_bytes(model, spec)
    atomic_write_bytes(Path(run_dir) / "model.safetensors", data)
    atomic_write_json(
        Path(run_dir) / "model.json",
        {"spec": spec.to_dict(), "sha256": hashlib.sha256(data).hexdigest()},
    )


def load_model(path: Path, device: str | torch.device = "cpu",
               expected: ModelSpec | None = None) -> ConvVAE:
    """Load a model from a run folder's final weights (``model.safetensors`` + ``model.json``)."""
    run = Path(path)
    try:
        meta = json.loads((run / "model.json").read_text())
        spec = ModelSpec.from_dict(meta["spec"])
    except FileNotFoundError:
        raise CheckpointError(f"{run}: no model.json: the run has not finished "
                              "(resume it with `vaelab train --resume`)") from None
    except (ValueError, KeyError, TypeError, VaelabError) as e:  # VaelabError: a bad spec
        raise CheckpointError(f"{run}/model.json is corrupted ({e})") from None
    try:
        held = weights_spec((run / "model.safetensors").read_bytes())
    except OSError:
        held = None  # _verified_bytes says why
    if held is not None and held != spec:
        raise CheckpointError(
            f"{run}: model.safetensors holds {_describe(held)}, but model.json describes "
            f"{_describe(spec)}: the two files are not from the same run"
        )
    check_spec(spec, expected, run)
    data = _verified_bytes(run / "model.safetensors", str(meta.get("sha256")), run)
    model = build_model(spec)
    load_weights(model, data, run)
    # channels_last, as in training: the convolutions run about 1.3x faster on CPU (log p(x))
    return model.to(device, memory_format=torch.channels_last).eval()


@dataclass
class Run:
    """A finished run, as ``load_run`` gives it back."""

    path: Path
    model: ConvVAE
    config: dict[str, Any]
    metrics: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def spec(self) -> ModelSpec:
        return self.model.spec

    @property
    def name(self) -> str:
        return self.path.name


def _read_json(path: Path) -> Any:
    """The JSON value in ``path``; CheckpointError "PATH is corrupted (...)" if it is not JSON."""
    try:
        return json.loads(path.read_text())
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise CheckpointError(f"{path} is corrupted ({_reason(e)})") from None


def _reason(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return text if len(text) <= 120 else text[:117] + "..."


def read_config(run_dir: str | os.PathLike) -> tuple[dict[str, Any], TrainConfig]:
    """A run folder's ``config.json``: the whole object, and its ``config`` as a checked
    ``TrainConfig`` (types and ranges; not the memory check, which is training's). Anything
    else, ``{}``, ``[1, 2]`` or ``"limit": "abc"`` say, is a CheckpointError naming the file."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{run_dir} is not a vaelab run folder (no config.json)")
    raw = _read_json(path)
    if not isinstance(raw, dict) or not isinstance(raw.get("config"), dict):
        raise CheckpointError(f"{path} is corrupted (not an object with a \"config\" object)")
    try:
        config = TrainConfig.from_dict(raw["config"]).validate(check_memory=False)
    except (VaelabError, ValueError, TypeError, OverflowError) as e:
        raise CheckpointError(f"{path} is corrupted ({_reason(e)})") from None
    return raw, config


# the fields of a metrics.jsonl row: a whole number, a number, or a list of numbers
_ROW_INTS = ("epoch", "step")
_ROW_NUMBERS = ("beta", "lr", "seconds", "images_per_s",
                *(f"{split}_{term}" for split in ("train", "val", "test")
                  for term in ("recon", "kl", "neg_elbo")), "train_loss")
_ROW_LISTS = tuple(f"{split}_kl_per_dim" for split in ("train", "val", "test"))
ROW_REQUIRED = ("epoch", "step", "train_recon", "train_kl", "train_neg_elbo")


def _is_number(v: Any) -> bool:
    """A JSON number a reader can turn into a float (NaN and infinities included)."""
    if isinstance(v, bool):
        return False
    return isinstance(v, float) or (isinstance(v, int) and v.bit_length() <= 1000)


def check_metrics_row(row: Any, where: str) -> dict[str, Any]:
    """``row`` if it is a metrics row vaelab could have written: an object with the required
    fields, whole numbers, numbers and lists of numbers where those belong (other fields are
    kept); else a CheckpointError naming ``where``."""
    if not isinstance(row, dict):
        raise CheckpointError(f"{where} is not a metrics row (an object), got {type(row).__name__}")
    missing = [k for k in ROW_REQUIRED if k not in row]
    if missing:
        raise CheckpointError(f"{where} lacks {', '.join(missing)}")
    for k in _ROW_INTS:
        if k in row and not (_is_number(row[k]) and isinstance(row[k], int) and row[k] >= 0):
            raise CheckpointError(f"{where}: {k} must be a whole number >= 0")
    for k in _ROW_NUMBERS:
        if k in row and not _is_number(row[k]):
            raise CheckpointError(f"{where}: {k} must be a number")
    for k in _ROW_LISTS:
        if k in row and not (isinstance(row[k], list) and all(map(_is_number, row[k]))):
            raise CheckpointError(f"{where}: {k} must be a list of numbers")
    return row


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a run's ``metrics.jsonl`` (none if it has none), each checked by
    ``check_metrics_row``: a line that is not JSON, or JSON of the wrong shape (``42``, a
    string where a number belongs, a missing field), is a CheckpointError naming its line."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise CheckpointError(f"{path} is not text (corrupted)") from None
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except (ValueError, RecursionError):
                raise CheckpointError(f"{path}: line {i} is not valid JSON") from None
            rows.append(check_metrics_row(row, f"{path}: line {i}"))
    return rows


def load_run(path: str | os.PathLike, device: str | torch.device = "cpu") -> Run:
    """Give back a finished run's model (eval mode, on ``device``), config, metrics and summary."""
    run = Path(path)
    if not run.exists():
        raise CheckpointError(f"run folder {run} does not exist")
    if not run.is_dir():
        raise CheckpointError(f"{run} is a file, not a run folder")
    raw, checked = read_config(run)
    # every reader finds each setting, of the right type (an older config lacks some)
    config = {**raw, "config": checked.to_dict()}
    try:
        trained = ModelSpec.from_dict(config["model"])
    except Exception:  # noqa: BLE001 - an older or hand-made config.json: no cross-check
        trained = None
    metrics = read_metrics(run)  # before the weights: a bad file is named without the cost
    model = load_model(run, device, expected=trained)
    summary: dict[str, Any] = {}
    if (run / "summary.json").exists():
        summary = _read_json(run / "summary.json")
        if not isinstance(summary, dict):
            raise CheckpointError(f"{run / 'summary.json'} is corrupted (not an object)")
    return Run(run, model, config, metrics, summary)
