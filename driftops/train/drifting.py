"""Flow-then-fit drift training (Deng et al., "Generative Modeling via Drifting"; Sinkhorn drifting).

Each round: draw ``batch`` samples x = G(z), move them by ``flow_steps`` drift steps toward target
samples (class c against class-c data only when conditional), then fit G to the moved points on the
same z by minibatch MSE. With one flow step of size 1 and ``minibatch == batch`` one round is one
step on ``MSE(G(z), stopgrad(G(z) + V))``, computed from a single forward pass.

Distributed: each rank moves its share of the samples by the drift of the whole batch against the whole target
batch and fits its share; DDP averages the ranks' gradients, which is the gradient of the global MSE.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..drift import DriftInfo
from ..errors import DriftopsError
from ..parallel import Launch, Sharding
from .config import TrainConfig
from .loop import Run
from .method import GeneratorMethod, drift_flow
from .targets import Target


def drift_targets(
    x: torch.Tensor,
    labels: torch.Tensor | None,
    positives: dict[int | None, torch.Tensor],
    cfg: TrainConfig,
    warm: dict[int | None, DriftInfo] | None = None,
    group: Sharding | None = None,
) -> tuple[torch.Tensor, float]:
    """Targets (N, D): x (N, D) moved by ``cfg.flow_steps`` drift steps, per class when ``labels`` (N,) is given.

    ``positives``: ``{None: y}`` or ``{c: y_c}`` as :meth:`GeneratorMethod.draw` returns. ``warm``: Sinkhorn
    states per class, used as warm starts and replaced by this round's (updated in place). Also returns
    the largest Sinkhorn marginal error met (0 for other plans). ``group``: x, labels and positives are this
    rank's slices, and the drifts those of the whole clouds.
    """
    x = x.detach()
    out = torch.empty_like(x)
    error = 0.0
    for c, y in positives.items():
        rows = slice(None) if c is None else labels == c
        result = drift_flow(x[rows], y, cfg, cfg.flow_steps, warm_start=None if warm is None else warm.get(c), group=group)
        if warm is not None and result.info is not None and result.info.sinkhorn:
            warm[c] = result.info
        out[rows] = result.x
        error = max(error, *result.history["marginal_error"])
    return out, error


class Drifting(GeneratorMethod):
    """Flow-then-fit: drift targets from a batch of samples, then ``batch / minibatch`` MSE steps.

    With ``minibatch == batch`` the samples' forward pass (with gradients) also serves the fit;
    otherwise they are drawn without gradients and each minibatch is re-evaluated.
    """

    name = "drifting"

    def __init__(self, cfg: TrainConfig, target: Target, launch: Launch | None = None) -> None:
        super().__init__(cfg, target, launch)
        if cfg.sinkhorn_warm and self.world > 1:
            raise DriftopsError("sinkhorn_warm carries Sinkhorn states of one process; drop --sinkhorn-warm for distributed runs (it is off by default)")
        # Sinkhorn state per class, carried from round to round (``cfg.sinkhorn_warm``); checkpointed.
        self.warm: dict[int | None, DriftInfo] | None = {} if cfg.sinkhorn_warm else None

    def state_dict(self) -> dict:
        return {"warm": self.warm}

    def load_state_dict(self, state: dict) -> None:
        self.warm = state.get("warm", self.warm)

    def round(self, run: Run) -> dict[str, float]:
        cfg = self.cfg
        z, labels, positives = self.draw(run.rng)
        if self.fit_batch == self.batch:
            x = run.net(z, labels)
            targets, error = drift_targets(x, labels, positives, cfg, self.warm, self.group)
            loss = F.mse_loss(x, targets)
            run.optimise(loss)
            return {"loss": float(loss.detach()), "marginal_error": error}
        with torch.no_grad():
            targets, error = drift_targets(run.model(z, labels), labels, positives, cfg, self.warm, self.group)
        order = torch.randperm(self.batch, generator=run.rng, device=cfg.device)
        losses = []
        for idx in order.split(self.fit_batch)[: run.remaining]:
            loss = F.mse_loss(run.net(z[idx], None if labels is None else labels[idx]), targets[idx])
            run.optimise(loss)
            losses.append(float(loss.detach()))
        return {"loss": sum(losses) / len(losses), "marginal_error": error}
