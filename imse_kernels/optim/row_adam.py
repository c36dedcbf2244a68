"""`RowAdam`: Adam over the rows of (K, r) tables, one independent Adam per row (docs/design.md, section 8).

`MultiStreamIMSE` keeps one code per stream as row k of each adapted layer's table; this optimizer gives
each stream its own moments and step count, so stream k is stepped exactly as `torch.optim.Adam` steps a
separate (r,) parameter.
"""
import copy

import torch
from torch import Tensor


class RowAdam:
    """Adam over the rows of (K, r) tables: row k of every table is stream k's parameter.

    Each row follows `torch.optim.Adam` (single-tensor CPU path: lerp, mul/addcmul, bias corrections from
    the stream's own step count, addcdiv) on a separate (r,) parameter, elementwise the same arithmetic.
    Only the rows passed to `step` change; `reset(k)` is a fresh optimizer for stream k.
    """

    def __init__(self, shapes: dict[str, tuple[int, int]], device, lr: float, betas: tuple[float, float],
                 eps: float = 1e-8) -> None:
        self.lr, self.betas, self.eps = float(lr), tuple(float(b) for b in betas), float(eps)
        self.exp_avg = {n: torch.zeros(k, r, device=device) for n, (k, r) in shapes.items()}
        self.exp_avg_sq = {n: torch.zeros(k, r, device=device) for n, (k, r) in shapes.items()}
        self.steps = [0] * next(iter(shapes.values()))[0]

    @torch.no_grad()
    def step(self, params: dict[str, Tensor], grads: dict[str, Tensor], rows: list[int]) -> None:
        """One Adam step of the listed rows of every table in `params`; `grads[n]` is (len(rows), r)."""
        if not rows:
            return
        b1, b2 = self.betas
        for k in rows:
            self.steps[k] += 1
        bc1 = [1 - b1 ** self.steps[k] for k in rows]
        bc2 = [(1 - b2 ** self.steps[k]) ** 0.5 for k in rows]
        any_p = next(iter(params.values()))
        idx = torch.tensor(rows, dtype=torch.long, device=any_p.device)
        neg_step = torch.tensor([-self.lr / c for c in bc1], dtype=torch.float32, device=any_p.device)[:, None]
        bc2_sqrt = torch.tensor(bc2, dtype=torch.float32, device=any_p.device)[:, None]
        for n, p in params.items():
            g = grads[n].to(torch.float32)
            m, v = self.exp_avg[n][idx], self.exp_avg_sq[n][idx]
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (v.sqrt() / bc2_sqrt).add_(self.eps)
            w = p[idx]
            w.addcdiv_(m * neg_step, denom)  # = w + (−lr/bc1)·m / denom, as Adam's addcdiv_(value=−step_size)
            self.exp_avg[n][idx] = m
            self.exp_avg_sq[n][idx] = v
            p[idx] = w

    @torch.no_grad()
    def reset(self, k: int) -> None:
        for n in self.exp_avg:
            self.exp_avg[n][k].zero_()
            self.exp_avg_sq[n][k].zero_()
        self.steps[k] = 0

    def grow(self) -> None:
        for d in (self.exp_avg, self.exp_avg_sq):
            for n, t in d.items():
                d[n] = torch.cat([t, t.new_zeros(1, t.shape[1])])
        self.steps.append(0)

    def export(self, k: int, names: list[str], param_groups: list) -> dict:
        """Stream k's state in the layout of IMSE's `optimizer.state_dict()` (copies)."""
        state = {}
        if self.steps[k] > 0:
            for i, n in enumerate(names):
                state[i] = {"step": torch.tensor(float(self.steps[k]), dtype=torch.float32),
                            "exp_avg": self.exp_avg[n][k].clone(), "exp_avg_sq": self.exp_avg_sq[n][k].clone()}
        return {"state": state, "param_groups": copy.deepcopy(param_groups)}

    @torch.no_grad()
    def load_row(self, k: int, names: list[str], state: dict) -> None:
        """Stream k's state from an IMSE-layout optimizer state (e.g. a bank entry's)."""
        per = state.get("state", {})
        if not per:
            self.reset(k)
            return
        per = {int(i): st for i, st in per.items()}  # a file's JSON may give the ids as strings
        for i, n in enumerate(names):
            self.exp_avg[n][k].copy_(per[i]["exp_avg"])
            self.exp_avg_sq[n][k].copy_(per[i]["exp_avg_sq"])
        self.steps[k] = int(per[0]["step"])

    def state_dict(self) -> dict:
        return {"steps": list(self.steps), "exp_avg": dict(self.exp_avg), "exp_avg_sq": dict(self.exp_avg_sq)}
