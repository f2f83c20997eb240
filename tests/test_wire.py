import pytest
import torch

from gossamer import wire


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_round_trip_and_exact_size(dtype):
    x = torch.randn(1234).to(dtype)
    data = wire.encode(x, sender=7, round=3, meta=9)
    assert len(data) == wire.encoded_size(x.numel(), dtype)
    header, y = wire.decode(data, expected_numel=1234)
    assert torch.equal(x, y) and header.sender == 7 and header.round == 3 and header.meta == 9


def test_rejects_malformed_messages():
    data = wire.encode(torch.zeros(4))
    with pytest.raises(ValueError, match="short"):
        wire.decode(data[:10])
    with pytest.raises(ValueError, match="magic"):
        wire.decode(b"XXXX" + data[4:])
    with pytest.raises(ValueError, match="length"):
        wire.decode(data + b"\0")
    with pytest.raises(ValueError, match="expected 5"):
        wire.decode(data, expected_numel=5)
