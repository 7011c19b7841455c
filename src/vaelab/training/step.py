"""One optimisation step, on the device: forward (bf16 autocast where chosen), the objective
(always fp32), backward, Adam and the epoch's running sums, with no read back to the host.

On CUDA the full-batch step is captured once as a CUDA graph and replayed (after
``WARMUP_STEPS`` eager steps on a side stream, as ``torch.cuda.graph`` asks): the step is a few
hundred small kernels whose launches cost more than their arithmetic. Both paths run the one
``body``, and the random numbers are drawn outside it, so they compute and resume alike.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from vaelab.config import TrainConfig
from vaelab.models import ConvVAE
from vaelab.objectives import elbo_terms, iwae_log_weights, iwae_loss, training_loss

WARMUP_STEPS = 3  # eager full-batch steps on CUDA before the training step is captured


def zero_sums(latent_dim: int, device: torch.device) -> dict[str, torch.Tensor]:
    """The epoch's running sums: the terms (recon, KL, -ELBO, loss, each summed over images),
    the KL per latent unit, the image count, and the first step whose loss was not finite."""
    return {
        "terms": torch.zeros(4, device=device, dtype=torch.float64),
        "kl_dim": torch.zeros(latent_dim, device=device, dtype=torch.float64),
        "count": torch.zeros((), device=device, dtype=torch.float64),
        "bad_step": torch.full((), -1, device=device, dtype=torch.int64),
    }


class TrainingStep:
    """The step of one run: ``take(x, y, eps, beta)`` updates the weights and the sums."""

    def __init__(self, model: ConvVAE, net: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 config: TrainConfig, device: torch.device, precision: str, *,
                 use_graph: bool, detect_anomaly: bool,
                 anomaly: Callable[[str], Exception]) -> None:
        """``net``: the model, or its DDP wrapper. ``anomaly(detail)``: the error to raise
        when autograd's anomaly mode finds a NaN."""
        self.model, self.net, self.optimizer = model, net, optimizer
        self.config, self.device, self.precision = config, device, precision
        self.use_graph, self.detect_anomaly, self._anomaly = use_graph, detect_anomaly, anomaly
        self.sums = zero_sums(config.latent_dim, device)
        # the index of the step in flight, on the device (a captured graph cannot read the
        # trainer's counter)
        self.step_index = torch.zeros((), device=device, dtype=torch.int64)
        self.graph: Any = None  # torch.cuda.CUDAGraph, once captured
        self._graph_inputs: tuple[torch.Tensor, ...] = ()
        self._eager_full_steps = 0

    def reset_sums(self) -> None:
        """Zero the running sums in place (a captured graph holds their addresses)."""
        for k, v in zero_sums(self.config.latent_dim, self.device).items():
            self.sums[k].copy_(v)

    def take(self, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor, beta: float,
             *, full_batch: bool) -> None:
        if self.use_graph and full_batch:
            self._graphed(x, y, eps, beta)
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.body(x, y, eps, beta)

    def body(self, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor,
             beta: float | torch.Tensor) -> None:
        """Forward, loss, backward, Adam and the running sums: device work only, in place."""
        cfg = self.config
        # autocast's weight cache must stay off under graph capture (and buys nothing here)
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16,
                                  enabled=self.precision == "bf16", cache_enabled=False)
        with autocast:
            out = self.net(x, y if self.model.conditional else None, eps=eps)
        mu, logvar, logits = out.mu.float(), out.logvar.float(), out.logits.float()
        if cfg.objective == "iwae":  # the metrics' ELBO terms from the first of the K samples
            terms = elbo_terms(x, mu, logvar, logits[0], cfg.likelihood)
            loss = iwae_loss(iwae_log_weights(x, out.z.float(), mu, logvar, logits,
                                              cfg.likelihood, beta))
        else:
            terms = elbo_terms(x, mu, logvar, logits, cfg.likelihood)
            loss = training_loss(terms, beta, cfg.free_bits)
        try:
            loss.backward()
        except RuntimeError as e:  # anomaly mode: "Function 'X' returned nan values ..."
            if not (self.detect_anomaly and "returned nan values" in str(e)):
                raise
            raise self._anomaly(f"autograd anomaly mode: {e}") from None
        self.optimizer.step()
        b = x.shape[0]
        with torch.no_grad():
            s = self.sums
            s["terms"] += torch.stack([terms.recon.sum(), terms.kl.sum(), terms.neg_elbo.sum(),
                                       loss * b]).double()
            s["kl_dim"] += terms.kl_per_dim.sum(0).double()
            s["count"] += b
            first_bad = ~torch.isfinite(loss) & (s["bad_step"] < 0)
            s["bad_step"].copy_(torch.where(first_bad, self.step_index, s["bad_step"]))
            self.step_index += 1

    def _graphed(self, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor,
                 beta: float) -> None:
        dev = self.device
        if self.graph is None and self._eager_full_steps < WARMUP_STEPS:
            # real steps, run eagerly on a side stream: cuDNN, cuBLAS and Adam's state are set
            # up before capture, as torch.cuda.graph asks
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                self.optimizer.zero_grad(set_to_none=True)
                self.body(x, y, eps, beta)
            torch.cuda.current_stream(dev).wait_stream(side)
            self._eager_full_steps += 1
            return
        if self.graph is None:
            self._graph_inputs = (x.clone(), y.clone(), eps.clone(),
                                  torch.zeros((), device=dev, dtype=torch.float32))
            self.optimizer.zero_grad(set_to_none=True)  # backward allocates .grad in the graph
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=torch.cuda.Stream(dev)):
                self.body(*self._graph_inputs)
            self.graph = graph  # capture runs nothing: the replay below does this step
        sx, sy, seps, sbeta = self._graph_inputs
        sx.copy_(x)
        sy.copy_(y)
        seps.copy_(eps)
        sbeta.fill_(beta)
        self.graph.replay()
