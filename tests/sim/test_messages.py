import numpy as np
import torch

from gossamer.sim.messages import MessageStore


def test_messages_keep_the_sender_row_as_sent_even_after_it_changes():
    params = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    sent = params.clone()
    store = MessageStore(3)
    store.put([10, 11, 12], [0, 1, 0], [1.0, 2.0, 3.0])        # two messages reference row 0
    store.detach([0, 3], params)                               # row 0 is about to change
    params[0] = -1.0
    store.put([13], [0], [4.0])                                # a later message: the new row
    crafted = torch.full((1, 3), 7.0)
    store.put_rows([14], crafted, [5.0])
    rows, ages, order = store.take([12, 11, 13, 14], params)
    expect = torch.stack([sent[0], sent[1], params[0], crafted[0]])
    assert torch.equal(rows, expect[torch.from_numpy(order)])
    assert torch.equal(ages, torch.tensor([3.0, 2.0, 4.0, 5.0])[torch.from_numpy(order)])
    assert sorted(order.tolist()) == [0, 1, 2, 3] and order.tolist()[:2] == [1, 2]   # references first
    assert len(store) == 1 and store.by_sender == {}           # message 10 is still in flight (a copy)
    store.discard(10)
    assert len(store) == 0 and len(store.free) == store.rows.shape[0]


def test_message_state_round_trips_as_copies():
    params = torch.randn(5, 4)
    store = MessageStore(4)
    store.put([3, 1], [2, 4], [0.5, 1.5])
    store.put_rows([2], torch.ones(1, 4), [2.5])
    ids, rows, ages = store.state(params)
    assert ids == [1, 2, 3]
    assert torch.equal(rows, torch.stack([params[4], torch.ones(4), params[2]]))
    other = MessageStore(4)
    other.load(ids, rows, ages.tolist())
    params[:] = 0.0                                            # the copies do not depend on params
    got, got_ages, order = other.take([1, 2, 3], params)
    assert np.array_equal(order, [0, 1, 2]) and torch.equal(got, rows) and torch.equal(got_ages, ages.float())
