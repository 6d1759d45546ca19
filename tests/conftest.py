import pytest
import torch
from torch import nn


class Trajectory(nn.Module):
    """A model whose weights we set by hand, to feed a tracker a known sequence."""

    def __init__(self, *shapes, dtype=torch.float32):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(s[1], s[0], bias=False, dtype=dtype) for s in shapes)

    @torch.no_grad()
    def set(self, *values):
        for layer, v in zip(self.layers, values):
            layer.weight.copy_(torch.as_tensor(v))


@pytest.fixture
def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3))


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(64, 8, generator=g), torch.randint(0, 3, (64,), generator=g)


def train_steps(model, opt, batch, n):
    X, y = batch
    for _ in range(n):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
