"""Sinkhorn-loss training (Genevay et al., "Learning Generative Models with Sinkhorn Divergences").

Each step minimises ``S_eps(G(z), y)`` (:func:`driftops.sinkhorn_divergence`, through GeomLoss)
by autodiff over ``batch`` samples and ``target_batch`` target points; conditional runs sum the
per-class divergences weighted by class frequency.

Distributed: the ranks' samples are all-gathered with ``torch.distributed.nn``'s differentiable collective, every
rank evaluates the divergence of the whole batch, and the gather's backward sums every rank's gradient with
respect to each rank's samples. Each rank's gradient is then ``world`` times its share of the global one, and
DDP's average over the ranks is the single-process gradient of the global batch.
"""

from __future__ import annotations

from ..divergence import sinkhorn_divergence
from ..errors import DriftopsError
from ..parallel import Launch
from .config import TrainConfig
from .loop import Run
from .method import GeneratorMethod
from .targets import Target


class SinkhornLoss(GeneratorMethod):
    """Minimise the debiased Sinkhorn divergence between generated and target batches."""

    name = "sinkhorn_loss"

    def __init__(self, cfg: TrainConfig, target: Target, launch: Launch | None = None) -> None:
        super().__init__(cfg, target, launch)
        if len(cfg.eps) != 1:
            raise DriftopsError(f"sinkhorn_loss takes one eps, got {cfg.eps}; pass a single --eps")

    def round(self, run: Run) -> dict[str, float]:
        cfg = self.cfg
        z, labels, positives = self.draw(run.rng)
        x = self.comm.gather(run.net(z, labels))  # (batch, D) of the whole run, differentiable
        labels = None if labels is None else self.comm.gather(labels)
        loss = x.new_zeros(())
        for c, y in positives.items():
            xc = x if c is None else x[labels == c]
            loss = loss + len(xc) / len(x) * sinkhorn_divergence(xc, self.comm.gather(y), cfg.eps[0], cfg.cost, cfg.scaling)
        run.optimise(loss)
        return {"loss": float(loss.detach())}
