"""The torch layers of the ``adapter`` method (kept apart so that its config imports no torch)."""

from __future__ import annotations

import torch


class BottleneckAdapter(torch.nn.Module):
    """x + up(GELU(down(x))), with ``up`` zero-initialized so that a new adapter is the
    identity and the adapted model starts equal to the base model (Houlsby et al., 2019)."""

    def __init__(self, width: int, bottleneck: int) -> None:
        super().__init__()
        self.down = torch.nn.Linear(width, bottleneck)
        self.up = torch.nn.Linear(bottleneck, width)
        torch.nn.init.zeros_(self.up.weight)
        torch.nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(torch.nn.functional.gelu(self.down(x)))


class Adapted(torch.nn.Module):
    """A frozen output projection followed by its bottleneck adapter."""

    def __init__(self, projection: torch.nn.Linear, bottleneck: int) -> None:
        super().__init__()
        self.projection = projection
        self.adapter = BottleneckAdapter(projection.out_features, bottleneck)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.projection(x))
