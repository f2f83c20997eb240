"""The upload pipeline's stages: the simulator's batched run of a stage equals a runtime
client's run on its own row followed by the server's decoding of the bytes it sent."""

import numpy as np
import pytest
import torch

from gossamer.compression import build_compressor
from gossamer.privacy.dp import dp_fedavg_updates
from gossamer.privacy.secagg import Client, Randomness, advertise_keys, share_keys
from gossamer.privacy.secagg_server import SecAggServer
from gossamer.protocols.private import ClientDP
from gossamer.protocols.upload import Compress, Uploads

P = 300


def _uploads(round_=3, clients=(4, 1, 7), extra=False):
    g = torch.Generator().manual_seed(round_)
    start = torch.randn(P, generator=g)
    rows = start + 0.1 * torch.randn(len(clients), P, generator=g)
    if extra:                                            # e.g. SCAFFOLD's control variates
        rows = torch.cat([rows, torch.randn(len(clients), P, generator=g)], dim=1)
    return Uploads.of(round_, np.array(clients), start, rows)


@pytest.mark.parametrize("name, params, feedback", [
    ("topk", {"density": 0.05}, "ef"), ("randk", {"density": 0.1}, "ef21"),
    ("qsgd", {"levels": 4}, "none"), ("topk", {"density": 0.05}, "dgc")])
def test_a_batch_compressed_at_once_equals_each_client_alone_through_the_wire(name, params, feedback):
    comp = Compress(build_compressor(name, params), feedback, seed=11,
                    density=params.get("density", 0.0))
    up = _uploads(extra=True)
    state = {k: v + 0.01 for k, v in comp.init(3, P).items()}       # not all-zero memory
    batched, decoded, new_state = comp.apply(up, state)
    for b, client in enumerate(up.clients):
        one = Uploads.of(up.round, up.clients[b: b + 1], up.start, up.rows()[b: b + 1])
        mine = {k: v[b: b + 1] for k, v in state.items()}
        sent, _, after = comp.apply(one, mine)
        data = comp.to_bytes(sent)
        assert len(data) == int(batched.encoded.nbytes[b]) + 4 * P      # exact wire bytes
        estimate = state["memory"][b] if feedback == "ef21" else None
        got, extra = comp.from_bytes(data, P, 2, int(client), up.round, estimate)
        assert torch.equal(got, decoded[b]) and torch.equal(extra, up.extra[b])
        for k in after:
            assert torch.equal(after[k][0], new_state[k][b])


def test_undecodable_bytes_are_one_value_error():
    comp = Compress(build_compressor("topk", {"density": 0.05}))
    with pytest.raises(ValueError):
        comp.from_bytes(b"\x07" * 13, P, 1, 0, 1, None)
    with pytest.raises(ValueError, match="extras"):
        comp.from_bytes(b"", P, 2, 0, 1, None)


def test_a_fetchsgd_upload_is_its_sketch_checked_never_decoded_alone():
    """The coordinator keeps each FetchSGD upload as its count sketch's table (summed with the
    others by ``Compress.fetch``): a client's bytes give back its table bit for bit, and a
    payload of the wrong size or with a non-finite bucket is one ValueError (a refused upload)."""
    from gossamer.protocols.upload import Pipeline

    sketch = build_compressor("countsketch", {"rows": 3, "ratio": 0.2, "density": 0.05})
    pipe = Pipeline(P, 1, compress=Compress(sketch, "fetchsgd", seed=5))
    up, _, _ = pipe.compress.apply(_uploads(clients=(2,)), {})
    data = pipe.compress.to_bytes(up)
    row, decoded = pipe.decode(data, 2, 3, torch.zeros(P), None)
    assert decoded is None and torch.equal(row, up.encoded.parts["table"][0].reshape(-1))
    with pytest.raises(ValueError, match="bytes"):
        pipe.decode(data[:-4], 2, 3, torch.zeros(P), None)
    bad = np.frombuffer(data, dtype="<f4").copy()
    bad[7] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        pipe.decode(bad.tobytes(), 2, 3, torch.zeros(P), None)


@pytest.mark.parametrize("noise", ["clients", "server"])
def test_dp_fedavg_split_into_client_and_server_halves_is_dp_fedavg(noise):
    up = _uploads()
    dp = ClientDP(clip_norm=0.5, noise_multiplier=1.3, noise=noise, seed=5)
    halves = dp.server(dp.client(up.delta(), up.clients, up.round, 6), up.round, 6)
    whole = dp_fedavg_updates(up.delta(), up.clients, up.round, clip_norm=0.5, noise_multiplier=1.3,
                              noise=noise, expected=6, seed=5)[0]
    assert torch.equal(halves, whole)


def test_a_server_with_server_noise_clips_what_a_client_did_not():
    up = _uploads()
    dp = ClientDP(clip_norm=0.5, noise_multiplier=0.0, noise="server", seed=5)
    loud = up.delta() * 1000                                         # a client ignoring the bound
    assert float(dp.server(loud, up.round, 3).norm()) <= 0.5 + 1e-5


def test_the_secure_aggregation_server_refuses_what_is_not_due():
    rand = Randomness(0)
    parties = {u: Client.new(u, None, rand) for u in (0, 1, 2)}
    server = SecAggServer([0, 1, 2], threshold=2, bits=32, size=4)
    with pytest.raises(ValueError, match="68 bytes"):
        server.receive("advertise_keys", 0, b"\x00" * 67)
    with pytest.raises(ValueError, match="68 bytes"):                 # claims to be client 1
        server.receive("advertise_keys", 0, advertise_keys(parties[1]))
    with pytest.raises(ValueError, match="not share_keys"):
        server.receive("share_keys", 0, b"")
    with pytest.raises(ValueError, match="not a member"):
        server.receive("advertise_keys", 9, advertise_keys(parties[0]))
    for u in (0, 1, 2):
        server.receive("advertise_keys", u, advertise_keys(parties[u]))
    with pytest.raises(ValueError, match="duplicate"):
        server.receive("advertise_keys", 0, advertise_keys(parties[0]))
    key_list = server.close()[0]
    msg = share_keys(parties[0], key_list, 2, rand)
    with pytest.raises(ValueError, match="share_keys"):
        server.receive("share_keys", 0, msg[:-1])                     # truncated
    server.receive("share_keys", 0, msg)
    assert server.expecting() == {1, 2}


def test_shares_that_do_not_rebuild_a_dropped_clients_key_are_an_error_not_a_wrong_sum():
    """Client 2 drops after sharing its keys; client 1's share of 2's mask key is corrupted:
    the server cannot rebuild a key matching 2's public key and says so (the coordinator then
    aborts the round) instead of unmasking a wrong sum."""
    from gossamer.privacy.secagg import encode, masked_input, unmasking

    rand = Randomness(1)
    parties = {u: Client.new(u, encode(np.full(4, 0.1 * u), 1000.0, 32), rand) for u in (0, 1, 2)}
    server = SecAggServer([0, 1, 2], threshold=2, bits=32, size=4)
    for u in (0, 1, 2):
        server.receive("advertise_keys", u, advertise_keys(parties[u]))
    keys = server.close()
    for u in (0, 1, 2):
        server.receive("share_keys", u, share_keys(parties[u], keys[u], 2, rand))
    forwarded = server.close()
    for u in (0, 1):                                             # 2 never sends its vector
        server.receive("masked_input", u, masked_input(parties[u], forwarded[u], 32))
    survivors = server.close()
    answers = {u: bytearray(unmasking(parties[u], survivors[u], 2)) for u in (0, 1)}
    answers[1][-1] ^= 0xFF                                       # the last entry: 2's key share
    for u in (0, 1):
        server.receive("unmasking", u, bytes(answers[u]))
    with pytest.raises(ValueError, match="client 2"):
        server.close()
