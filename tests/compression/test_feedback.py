import numpy as np
import pytest
import torch

from gossamer.compression import (
    QSGD,
    Identity,
    ScaledSign,
    TopK,
    ef21,
    ef21_receive,
    error_feedback,
)


@pytest.mark.parametrize("compressor", [TopK(density=0.1), ScaledSign(), QSGD(levels=2)])
def test_error_feedback_loses_nothing_over_time(compressor):
    gen = torch.Generator().manual_seed(0)
    rows, numel, steps = 4, 50, 12
    memory, sent, total = None, torch.zeros(rows, numel, dtype=torch.float64), 0
    for t in range(steps):
        x = torch.randn(rows, numel, generator=gen)
        enc, decoded, memory = error_feedback(compressor, x, memory, seed=1,
                                              keys=np.arange(rows) + 100 * t)
        assert torch.equal(decoded, compressor.decompress(enc))
        sent += decoded.double()
        total = total + x.double()
    assert torch.allclose(sent + memory.double(), total, atol=1e-4)
    assert memory.abs().sum() > 0  # something was really held back


def test_error_feedback_memory_is_what_was_not_sent():
    x = torch.tensor([[3.0, -1.0, 0.5, 2.0]])
    memory = torch.tensor([[0.0, -2.5, 0.0, 0.5]])
    enc, decoded, new = error_feedback(TopK(k=2), x, memory)
    assert torch.equal(decoded, torch.tensor([[3.0, -3.5, 0.0, 0.0]]))
    assert torch.equal(new, torch.tensor([[0.0, 0.0, 0.5, 2.5]]))
    assert enc.nbytes[0] == 4 + 1 + 2 * 4  # count, a 1-byte bitmap, two float32


def test_ef21_estimate_recursion_and_receiver_agreement():
    gen = torch.Generator().manual_seed(1)
    c = TopK(k=3)
    x = torch.randn(2, 12, generator=gen)
    g_sender, g_receiver = None, torch.zeros(2, 12)
    for t in range(6):
        enc, g_new = ef21(c, x, g_sender, keys=np.arange(2) + t)
        before = torch.zeros_like(x) if g_sender is None else g_sender
        assert torch.equal(g_new, before + c.decompress(enc))
        # The receiver rebuilds the same estimate from the bytes alone.
        g_receiver = torch.stack([ef21_receive(g_receiver[i], c.from_bytes(c.to_bytes(enc, i), 12))
                                  for i in range(2)])
        assert torch.equal(g_receiver, g_new)
        g_sender = g_new
    # A fixed x is learnt: top-3 of the residual each step, all 12 entries after 4 steps.
    assert torch.allclose(g_sender, x)


def test_ef21_with_identity_gets_x_in_one_step():
    x = torch.randn(3, 7)
    assert torch.equal(ef21(Identity(), x, torch.ones(3, 7))[1], x - 1 + 1)
