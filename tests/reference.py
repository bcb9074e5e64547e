"""Independent dense implementations of the drift formulas, written from the equations (no driftops code)."""

from __future__ import annotations

import torch


def cost(x, y, kind):
    sq = ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
    return sq if kind == "sqeuclidean" else sq.sqrt()


def masked_logits(x, y, eps, kind, mask):
    s = -cost(x, y, kind) / eps
    if mask:
        s = s.masked_fill(torch.eye(x.shape[0], dtype=torch.bool), -float("inf"))
    return s


def one_sided_map(x, y, eps, kind="sqeuclidean", mask=False):
    return torch.softmax(masked_logits(x, y, eps, kind, mask), 1) @ y


def two_sided_map(x, y, eps, kind="sqeuclidean", mask=False):
    s = masked_logits(x, y, eps, kind, mask)
    a = torch.sqrt(torch.softmax(s, 1) * torch.softmax(s, 0))
    return (a / a.sum(1, keepdim=True)) @ y


def sinkhorn_map(x, y, eps, kind="sqeuclidean", iters=50000, wx=None, wy=None):
    """Row-normalised Sinkhorn plan by plain (non-annealed) log-domain iterations, run to machine precision.

    wx, wy: optional non-negative weights of the points (uniform when None)."""
    s = -cost(x, y, kind) / eps
    la = torch.full((x.shape[0],), -torch.log(torch.tensor(float(x.shape[0]))).item(), dtype=x.dtype) if wx is None else (wx / wx.sum()).log()
    lb = torch.full((y.shape[0],), -torch.log(torch.tensor(float(y.shape[0]))).item(), dtype=x.dtype) if wy is None else (wy / wy.sum()).log()
    f = torch.zeros(x.shape[0], dtype=x.dtype)
    g = torch.zeros(y.shape[0], dtype=x.dtype)
    for _ in range(iters):
        f_old = f
        f = -torch.logsumexp(s + lb[None, :] + g[None, :], 1)
        g = -torch.logsumexp(s + la[:, None] + f[:, None], 0)
        if (f - f_old).abs().max() < 1e-13 * max(eps, 1.0):
            break
    return torch.softmax(s + lb[None, :] + g[None, :], 1) @ y


def drift(x, y, eps, plan, kind="sqeuclidean", mask=True):
    fn = {"one_sided": one_sided_map, "two_sided": two_sided_map}.get(plan)
    if fn is None:
        return sinkhorn_map(x, y, eps, kind) - sinkhorn_map(x, x, eps, kind)
    return fn(x, y, eps, kind) - fn(x, x, eps, kind, mask)


def joint_drift(x, y_pos, y_neg, eps, kind="euclidean", mask=True):
    """Deng et al., Algorithm 2, transcribed (the self pairs get a +1e6 distance there; -inf here)."""
    logit_pos = -cost(x, y_pos, kind) / eps
    logit_neg = masked_logits(x, y_neg, eps, kind, mask)
    logit = torch.cat([logit_pos, logit_neg], 1)
    a = torch.sqrt(torch.softmax(logit, 1) * torch.softmax(logit, 0))
    a_pos, a_neg = a[:, : y_pos.shape[0]], a[:, y_pos.shape[0] :]
    w_pos = a_pos * a_neg.sum(1, keepdim=True)
    w_neg = a_neg * a_pos.sum(1, keepdim=True)
    return w_pos @ y_pos - w_neg @ y_neg
