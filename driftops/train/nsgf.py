"""Neural Sinkhorn Gradient Flow (Zhu et al., NSGF): velocity matching on a Sinkhorn particle flow.

The pool: ``batch`` particles x_0 drawn from the source (N(0, I), or a toy: ``TrainConfig.source``) flow to
``target_batch`` target points by ``flow_steps`` steps ``x_{k+1} = x_k + step_size * V(x_k)``
(:func:`driftops.flow`, warm-started). It stores ``(x_k, t_k = k/K, v_k = K * step_size * V(x_k))``, so that Euler
steps of size 1/K with v reproduce the flow on t in [0, 1]. A :class:`~driftops.models.VelocityField` regresses v by
MSE; sampling integrates it with ``sample_steps`` Euler steps (default ``flow_steps``).

Distributed: each rank flows its share of the particles against its share of the target points along the drift
of the whole clouds and keeps the triples of its own particles; every step regresses a share of the minibatch on
each rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..data import sample_toy
from ..errors import DriftopsError
from ..models import VelocityField
from ..parallel import Launch
from .config import TrainConfig
from .loop import Run
from .method import Method, drift_flow
from .targets import Target


class NSGF(Method):
    """Velocity matching on a trajectory pool built at the first round and kept in the checkpoint."""

    name = "nsgf"

    def __init__(self, cfg: TrainConfig, target: Target, launch: Launch | None = None) -> None:
        super().__init__(cfg, target, launch)
        if cfg.conditional:
            raise DriftopsError("nsgf has no class-conditional velocity field; drop --conditional or use --method drifting")
        if cfg.source != "gaussian" and target.dim != 2:
            raise DriftopsError(f"a toy source is 2D but target {cfg.target!r} has dimension {target.dim}; pass --source gaussian")
        self.pool: dict[str, torch.Tensor] | None = None

    def build_model(self) -> nn.Module:
        return VelocityField(self.target.dim, self.cfg.hidden, self.cfg.blocks)

    def start(self, n: int, rng: torch.Generator) -> torch.Tensor:
        """(n, D) starting points of the flow and of sampling: N(0, I) noise or the source toy, drawn from ``rng``."""
        if self.cfg.source == "gaussian":
            return self.noise(n, self.target.dim, rng)
        return sample_toy(self.cfg.source, n, rng, self.cfg.torch_dtype, self.cfg.device)

    def build_pool(self, rng: torch.Generator) -> None:
        """Run the Sinkhorn particle flow and store its (x, t, v) triples, each (flow_steps * batch, ...) (this rank's)."""
        cfg = self.cfg
        x0 = self.start(self.batch, rng)
        y = self.target.sample(self.target_batch, rng)
        k_total = cfg.flow_steps
        xs = [x0]

        def record(step: int, x: torch.Tensor, info) -> None:
            xs.append(x.clone())

        drift_flow(x0, y, cfg, k_total, record, group=self.group)
        path = torch.stack(xs)  # (K + 1, batch, D): x_0 .. x_K
        t = torch.arange(k_total, dtype=x0.dtype, device=x0.device) / k_total
        # x_{k+1} - x_k = step_size * V(x_k), so K * (x_{k+1} - x_k) = K * step_size * V(x_k).
        self.pool = {"x": path[:-1].flatten(0, 1), "t": t.repeat_interleave(len(x0)), "v": (k_total * (path[1:] - path[:-1])).flatten(0, 1)}

    def round(self, run: Run) -> dict[str, float]:
        if self.pool is None:
            self.build_pool(run.rng)
        idx = torch.randint(len(self.pool["x"]), (self.fit_batch,), generator=run.rng, device=self.cfg.device)
        loss = F.mse_loss(run.net(self.pool["x"][idx], self.pool["t"][idx]), self.pool["v"][idx])
        run.optimise(loss)
        return {"loss": float(loss.detach())}

    def sample(self, model: nn.Module, n: int, labels: torch.Tensor | None, rng: torch.Generator) -> torch.Tensor:
        steps = self.cfg.sample_steps or self.cfg.flow_steps
        x = self.start(n, rng)
        for i in range(steps):
            x = x + model(x, i / steps) / steps
        return x

    def state_dict(self) -> dict:
        return {"pool": self.pool}

    def load_state_dict(self, state: dict) -> None:
        self.pool = state["pool"]
