"""The tiny model builders: ``seed`` fixes the weights without touching the caller's random stream."""

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from zreward.tiny import FAMILIES  # noqa: E402


def _weights(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_seed_fixes_the_weights_and_leaves_the_callers_stream(family):
    """The builders called torch.manual_seed(seed): a user's later random numbers restarted from it."""
    build = FAMILIES[family]
    torch.manual_seed(1234)
    expected_next = torch.rand(4)
    torch.manual_seed(1234)
    a = _weights(build(seed=5)[0])
    assert torch.equal(torch.rand(4), expected_next)  # the caller's stream went on where it was
    assert torch.equal(_weights(build(seed=5)[0]), a)
    assert not torch.equal(_weights(build(seed=6)[0]), a)
    # seed=None draws from (and advances) the global stream: the same weights as seed=5 after manual_seed(5)
    torch.manual_seed(5)
    assert torch.equal(_weights(build(seed=None)[0]), a)
    with pytest.raises(TypeError, match="seed must be an int or None"):
        build(seed="5")
    assert torch.equal(_weights(build(seed=np.int64(5))[0]), a)  # a numpy integer was refused
