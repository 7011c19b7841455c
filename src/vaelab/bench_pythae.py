"""pythae's ``TrainingPipeline`` as a ``vaelab bench`` contender, on vaelab's own network.

pythae (the version the issue measured, 0.1.2) is optional: ``pythae_missing()`` says in one
line why it cannot be used, and the bench measures the rest.

The network is the very modules of a vaelab model (``ConvVAE`` / ``ConvCVAE``: same layers, same
initialisation) wrapped in pythae's ``BaseEncoder`` / ``BaseDecoder``, so the comparison is of
how the training is driven. pythae trains the way its users get it: its ``VAE`` (Bernoulli
likelihood: ``reconstruction_loss="bce"`` on the decoder's sigmoid, beta = 1), Adam, fp32, its
``BaseDataset`` indexed one image at a time through a ``DataLoader``, ``.item()`` of the loss and
a tqdm bar every step. pythae has no conditional VAE; for the CVAE its ``VAE.forward`` is
repeated with the labels (which its ``BaseDataset`` already carries) handed to both networks.

``PythaeContender`` runs ``TrainingPipeline`` once for one epoch (the warm-up: pythae's whole
path, its sanity checks and its save included), then times each round as one more epoch of the
trainer the pipeline built: ``on_epoch_begin``, ``train_step``, ``on_epoch_end``, which is what
``BaseTrainer.train`` does per epoch less its best-model copy and checkpoint saving.
"""

from __future__ import annotations

import contextlib
import io
import logging
import random
import shutil
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vaelab.data import Split
from vaelab.models import ConvVAE

PYTHAE_VERSION = "0.1.2"


def pythae_missing() -> str | None:
    """None when pythae can be imported, else one line saying why it is left out."""
    try:
        import pythae  # noqa: F401
        from pythae.pipelines import TrainingPipeline  # noqa: F401
    except Exception as e:  # ImportError, or a broken install failing at import
        return (f"pythae is not installed ({type(e).__name__}: {e}); "
                f"`pip install pythae=={PYTHAE_VERSION}` (or vaelab[bench]) to compare with it")
    return None


def pythae_version() -> str:
    """The installed pythae's version (it has no ``__version__``)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pythae")
    except PackageNotFoundError:
        return "unknown"


def _classes() -> dict[str, Any]:
    """pythae's classes and vaelab's wrappers around them, built on first use (pythae is
    imported only when it is measured)."""
    from pythae.models import VAE, VAEConfig
    from pythae.models.base.base_utils import ModelOutput
    from pythae.models.nn import BaseDecoder, BaseEncoder
    from pythae.pipelines import TrainingPipeline
    from pythae.trainers import BaseTrainerConfig

    class VaelabEncoder(BaseEncoder):
        """vaelab's encoder (and, for a CVAE, its label map) as a pythae encoder."""

        def __init__(self, net: ConvVAE) -> None:
            BaseEncoder.__init__(self)
            self.conditional = net.conditional
            self.image_size = net.spec.image_size
            self.encoder = net.encoder
            if net.conditional:
                self.label_map = net.label_map

        def forward(self, x: Tensor, y: Tensor | None = None) -> ModelOutput:
            if self.conditional:  # as ConvCVAE.encode: the label as an extra channel
                n = self.image_size
                x = torch.cat([x, self.label_map(y).view(-1, 1, n, n).to(x.dtype)], 1)
            mu, logvar = self.encoder(x)
            return ModelOutput(embedding=mu, log_covariance=logvar)

    class VaelabDecoder(BaseDecoder):
        """vaelab's decoder as a pythae decoder: pythae's "bce" wants probabilities."""

        def __init__(self, net: ConvVAE) -> None:
            BaseDecoder.__init__(self)
            self.conditional = net.conditional
            self.num_classes = net.spec.num_classes
            self.decoder = net.decoder

        def forward(self, z: Tensor, y: Tensor | None = None) -> ModelOutput:
            if self.conditional:  # as ConvCVAE.decode
                onehot = torch.nn.functional.one_hot(y, self.num_classes).to(z.dtype)
                logits = self.decoder(torch.cat([z, onehot], 1), y)
            else:
                logits = self.decoder(z)
            return ModelOutput(reconstruction=torch.sigmoid(logits))

    class CountingVAE(VAE):
        """pythae's ``VAE``, counting the images of every training forward; with
        ``conditional`` its forward repeated with the labels given to both networks."""

        images = 0
        conditional = False

        def forward(self, inputs, **kwargs):
            x = inputs["data"]
            if self.training:
                self.images += x.shape[0]
            if not self.conditional:
                return VAE.forward(self, inputs, **kwargs)
            y = inputs["labels"].long()  # pythae's BaseDataset keeps labels as floats
            enc = self.encoder(x, y)
            mu, log_var = enc.embedding, enc.log_covariance
            z, _ = self._sample_gauss(mu, torch.exp(0.5 * log_var))
            recon_x = self.decoder(z, y)["reconstruction"]
            loss, recon_loss, kld = self.loss_function(recon_x, x, mu, log_var, z)
            return ModelOutput(recon_loss=recon_loss, reg_loss=kld, loss=loss,
                               recon_x=recon_x, z=z)

    return {"VAE": CountingVAE, "VAEConfig": VAEConfig, "Encoder": VaelabEncoder,
            "Decoder": VaelabDecoder, "TrainingPipeline": TrainingPipeline,
            "BaseTrainerConfig": BaseTrainerConfig}


def pythae_model(net: ConvVAE) -> Any:
    """pythae's VAE around ``net``'s own modules (its parameters are ``net``'s, shared)."""
    c = _classes()
    n = net.spec.image_size
    config = c["VAEConfig"](input_dim=(1, n, n), latent_dim=net.spec.latent_dim,
                            reconstruction_loss="bce")
    model = c["VAE"](config, encoder=c["Encoder"](net), decoder=c["Decoder"](net))
    model.conditional = net.conditional
    return model


@contextlib.contextmanager
def _contained() -> Iterator[None]:
    """pythae's trainer seeds ``random``, numpy and torch globally, logs at INFO and draws a
    tqdm bar on stderr: put the generators back afterwards and keep its output off screen."""
    py_state, np_state = random.getstate(), np.random.get_state()
    loggers = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
               if name == "pythae" or name.startswith("pythae.")]
    levels = [lg.level for lg in loggers]
    try:
        with torch.random.fork_rng(devices=[]), contextlib.redirect_stderr(io.StringIO()), \
                contextlib.redirect_stdout(io.StringIO()):
            for lg in loggers:
                lg.setLevel(logging.WARNING)
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
        random.setstate(py_state)
        np.random.set_state(np_state)


class PythaeContender:
    """pythae training ``net`` for ``steps`` steps of ``batch_size`` images per ``round()``.

    Its training set is the first ``steps * batch_size`` images of ``split`` (repeated when the
    split is smaller), so one of its epochs is exactly ``steps`` full batches.
    """

    def __init__(self, net: ConvVAE, split: Split, *, steps: int, batch_size: int = 128,
                 device: str = "cpu", lr: float = 1e-3, seed: int = 0) -> None:
        from pythae.data.preprocessors import DataProcessor

        c = _classes()
        idx = torch.arange(steps * batch_size) % len(split.labels)
        data = split.images[idx].cpu().float().div(255.0).unsqueeze(1)
        labels = split.labels[idx].cpu().long()
        self._dir = tempfile.mkdtemp(prefix="vaelab-pythae-")
        with _contained():  # building pythae's objects draws from the global generators too
            self.model = pythae_model(net)
            config = c["BaseTrainerConfig"](
                output_dir=self._dir, per_device_train_batch_size=batch_size, num_epochs=1,
                learning_rate=lr, optimizer_cls="Adam", seed=seed,
                no_cuda=torch.device(device).type != "cuda")
            dataset = DataProcessor.to_dataset(data, labels)
            self.pipeline = c["TrainingPipeline"](training_config=config, model=self.model)
            self.pipeline(train_data=dataset)  # the warm-up: one epoch, pythae's whole path
        self.trainer = self.pipeline.trainer
        self.epoch = 1

    def round(self) -> dict[str, Any]:
        """(seconds, images) of one more epoch of pythae's trainer."""
        tr = self.trainer
        self.epoch += 1
        before = self.model.images
        with _contained():
            t0 = time.perf_counter()
            tr.callback_handler.on_epoch_begin(training_config=tr.training_config,
                                               epoch=self.epoch, train_loader=tr.train_loader,
                                               eval_loader=tr.eval_loader)
            loss = tr.train_step(self.epoch)
            tr.callback_handler.on_epoch_end(training_config=tr.training_config)
            seconds = time.perf_counter() - t0
        return {"seconds": seconds, "images": self.model.images - before, "loss": loss}

    def close(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)
