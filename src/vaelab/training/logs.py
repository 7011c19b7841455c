"""What a run shows while it trains: the progress bar, the line per epoch, and TensorBoard."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from vaelab.data import Split
from vaelab.errors import ConfigError
from vaelab.models import ConvVAE


def progress_bar(enabled: bool) -> Any:
    """A rich progress bar (a context manager), or ``nullcontext(None)`` when not ``enabled``."""
    if not enabled:
        return nullcontext(None)
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
    )


def bar_status(epoch: int, epochs: int, recon: float, kl: float, beta: float) -> str:
    return f"epoch {epoch}/{epochs}  recon {recon:6.2f}  KL {kl:5.2f}  beta {beta:.2f}"


def epoch_line(row: dict[str, Any], epochs: int) -> str:
    """The log line of a finished epoch (``row``: its metrics)."""
    return (
        f"epoch {row['epoch']:>3}/{epochs}  train -ELBO {row['train_neg_elbo']:7.2f}  "
        + (f"test recon {row['test_recon']:7.2f}  KL {row['test_kl']:5.2f}  "
           f"-ELBO {row['test_neg_elbo']:7.2f}  " if "test_recon" in row else "")
        + f"beta {row['beta']:.2f}  {row['images_per_s']:,.0f} img/s"
    )


class TensorBoardLog:
    """Each epoch's scalars, and 32 test reconstructions and samples, in ``out/tensorboard``."""

    def __init__(self, out: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("--tensorboard needs the tensorboard package: "
                              "pip install 'vaelab[tensorboard]'") from None
        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"))

    def epoch(self, row: dict[str, Any], model: ConvVAE, test: Split, latent_dim: int,
              device: torch.device) -> None:
        for k, v in row.items():
            if isinstance(v, (int, float)) and k != "epoch":
                self.writer.add_scalar(k.replace("_", "/", 1), v, row["epoch"])
        with torch.inference_mode():
            model.eval()
            x = test.images[:32].to(device).unsqueeze(1).float() / 255
            y = test.labels[:32].to(device)
            yy = y if model.conditional else None
            mu, _ = model.encode(x, yy)
            recon = torch.sigmoid(model.decode(mu, yy))
            z = torch.randn(32, latent_dim,
                            generator=torch.Generator().manual_seed(0)).to(device)
            samples = torch.sigmoid(model.decode(z, yy))
            model.train()
        self.writer.add_images("reconstructions", torch.cat([x, recon]).cpu(), row["epoch"])
        self.writer.add_images("samples", samples.cpu(), row["epoch"])

    def close(self) -> None:
        self.writer.close()
