"""The relu² MLP of NemotronH (`-` layers, MoE experts, shared experts): down(relu(up(x))²), no gate."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class MLP(nn.Module):
    """x [..., hidden] → [..., hidden] through `intermediate` relu² units."""

    def __init__(self, hidden: int, intermediate: int, bias: bool = False):
        super().__init__()
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(torch.relu(self.up_proj(x)).square())
