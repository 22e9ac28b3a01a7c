"""Helpers shared by the world-model tests."""

import pytest
import torch

from maskc.world_model.configs import TINY
from maskc.world_model.dit import WorldModel


def randomized(model, std=0.3, seed=0):
    """Re-draw the zero-initialised parameters (gates, output layer) so every path carries signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # small tensors: one thread avoids oversubscription on shared CI machines
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return randomized(WorldModel(TINY)).eval()
