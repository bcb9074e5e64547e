"""Sinkhorn-loss training (Genevay et al., "Learning Generative Models with Sinkhorn Divergences").

Each step minimises ``S_eps(G(z), y)`` (:func:`driftops.sinkhorn_divergence`, through GeomLoss)
by autodiff over ``batch`` samples and ``target_batch`` target points; conditional runs sum the
per-class divergences weighted by class frequency.
"""

from __future__ import annotations


from ..divergence import sinkhorn_divergence
from ..errors import DriftopsError
from .loop import Run
from .method import GeneratorMethod


class SinkhornLoss(GeneratorMethod):
    """Minimise the debiased Sinkhorn divergence between generated and target batches."""

    name = "sinkhorn_loss"

    def __init__(self, cfg, target) -> None:
        super().__init__(cfg, target)
        if len(cfg.eps) != 1:
            raise DriftopsError(f"sinkhorn_loss takes one eps, got {cfg.eps}; pass a single --eps")

    def round(self, run: Run) -> dict[str, float]:
        cfg = self.cfg
        z, labels, positives = self.draw(run.rng)
        x = run.model(z, labels)
        loss = x.new_zeros(())
        for c, y in positives.items():
            xc = x if c is None else x[labels == c]
            loss = loss + len(xc) / len(x) * sinkhorn_divergence(xc, y, cfg.eps[0], cfg.cost, cfg.scaling)
        run.optimise(loss)
        return {"loss": float(loss.detach())}
