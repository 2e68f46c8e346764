"""MINIDIST_STRICT_P2P=1: NCCL's point-to-point rules on gloo (comm/strict.py), and the patterns they caught."""
import ast
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from minidist import RankError, comm, launch
from minidist.comm import p2p, ring

TIMEOUT = 2  # seconds a message waits for its peer in these tests


@pytest.fixture
def strict(monkeypatch):
    monkeypatch.setenv("MINIDIST_STRICT_P2P", "1")   # forked ranks inherit it


def exchange(batched: bool):
    """Each rank sends 1,000 floats to the other and receives as many from it: the ring's step at N = 2."""
    peer = 1 - dist.get_rank()
    out, back = torch.full((1000,), float(dist.get_rank())), torch.empty(1000)
    if batched:
        works = comm.batch_isend_irecv([comm.P2POp(comm.isend, out, peer), comm.P2POp(comm.irecv, back, peer)])
        for w in works:
            w.wait()
    else:
        work = p2p.isend(out, peer)
        p2p.recv(back, peer)
        work.wait()
    return back[0].item()


@pytest.mark.usefixtures("no_leftover_processes", "strict")
def test_an_unbatched_send_then_recv_with_one_peer_deadlocks_and_the_diagnosis_names_it():
    start = time.monotonic()
    with pytest.raises(RankError) as error:
        launch(exchange, 2, False, timeout=TIMEOUT)
    assert time.monotonic() - start < TIMEOUT + 15
    text = str(error.value).split("Diagnosis from every rank's flight recorder:")[1]
    assert ("ranks 0 and 1 wait for each other: rank 0 waits in send #1 to rank 1 (float32, 1,000 elements) and "
            "posted recv #1 from rank 1 after it; rank 1 waits in send #1 to rank 0 (float32, 1,000 elements) and "
            "posted recv #1 from rank 0 after it.") in text, text
    assert "must be posted together, in one batch_isend_irecv" in text, text


@pytest.mark.usefixtures("strict")
def test_the_same_exchange_batched_passes_under_strict_rules():
    assert launch(exchange, 2, True, timeout=TIMEOUT) == [1.0, 0.0]


def test_the_unbatched_exchange_passes_on_plain_gloo_which_is_why_strict_mode_exists(monkeypatch):
    monkeypatch.delenv("MINIDIST_STRICT_P2P", raising=False)
    assert launch(exchange, 2, False, timeout=TIMEOUT) == [1.0, 0.0]


def order_within_a_pair():
    """Rank 0 posts a send then a receive with rank 1 (unbatched); rank 1 receives first, then sends: fine on NCCL."""
    x = torch.zeros(4)
    if dist.get_rank() == 0:
        work = p2p.isend(torch.arange(4.0), 1)
        p2p.recv(x, 1)
        work.wait()
    else:
        p2p.recv(x, 0)
        p2p.send(x * 10, 0)
    return x.tolist()


@pytest.mark.usefixtures("strict")
def test_messages_posted_in_a_compatible_order_pass_unbatched():
    assert launch(order_within_a_pair, 2, timeout=TIMEOUT) == [[0.0, 10.0, 20.0, 30.0], [0.0, 1.0, 2.0, 3.0]]


def ring_and_all_to_all(numel: int):
    n, r = dist.get_world_size(), dist.get_rank()
    x = torch.arange(numel, dtype=torch.int64) + 1000 * r
    summed = ring.ring_all_reduce(x)
    broadcast = ring.chain_broadcast(x, src=0)
    swapped = p2p.all_to_all(torch.arange(2 * n) + 100 * r)
    with comm.ring_backend():
        backend_sum = comm.all_reduce_sum(x.clone())
    return summed, broadcast, swapped, backend_sum


@pytest.mark.usefixtures("strict")
@pytest.mark.parametrize("world_size", [2, 3])
def test_the_ring_all_to_all_and_chain_broadcast_pass_under_strict_rules(world_size):
    """The ring's step and all_to_all's step each post their send and receive as one batch: at N = 2 both are
    the same peer, and two unbatched operations would deadlock (the test above)."""
    numel, n = 1001, world_size
    expected = sum(torch.arange(numel, dtype=torch.int64) + 1000 * r for r in range(n))
    for r, (summed, broadcast, swapped, backend_sum) in enumerate(launch(ring_and_all_to_all, n, numel,
                                                                        timeout=TIMEOUT + 8)):
        assert torch.equal(summed, expected) and torch.equal(backend_sum, expected)
        assert torch.equal(broadcast, torch.arange(numel, dtype=torch.int64))
        assert swapped.tolist() == [2 * r + k + 100 * s for s in range(n) for k in range(2)]


def test_ring_and_p2p_post_every_message_through_the_strict_layer():
    """A direct torch.distributed send/recv in ring.py or p2p.py would escape MINIDIST_STRICT_P2P's rules (the ring's
    unbatched isend + recv passed unnoticed that way)."""
    for name in ("ring.py", "p2p.py"):
        tree = ast.parse((Path(ring.__file__).parent / name).read_text())
        calls = [n.func.attr for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
                 and isinstance(n.func.value, ast.Name) and n.func.value.id == "dist"]
        direct = {"send", "recv", "isend", "irecv"} & set(calls)
        assert not direct, f"{name} calls dist.{sorted(direct)} directly; post through strict.py"


BATCHES = []


def lone_messages():
    x = torch.ones(4)
    comm.send(x, 1) if dist.get_rank() == 0 else comm.recv(x, 0)
    return list(BATCHES)


@pytest.mark.usefixtures("no_leftover_processes")
def test_every_message_is_posted_as_a_batch_even_alone(monkeypatch):
    """On NCCL a lone isend/irecv runs on the pair's own communicator and a batch on the group's: a message posted
    alone on one side and batched on the other never matches (an all-to-all that skips an empty message, at 3 ranks
    or more). So minidist posts every message through batch_isend_irecv, a single one as a batch of one."""
    monkeypatch.setenv("MINIDIST_STRICT_P2P", "0")   # the real batch_isend_irecv (strict mode emulates it on gloo)
    real = dist.batch_isend_irecv
    monkeypatch.setattr(p2p.dist, "batch_isend_irecv", lambda ops: BATCHES.append(len(ops)) or real(ops))
    assert launch(lone_messages, 2) == [[1], [1]]  # forked ranks inherit the patch


@pytest.mark.usefixtures("no_leftover_processes", "strict")
def test_a_receive_left_pending_across_an_all_to_all_deadlocks_under_strict_rules():
    """test_comm_counted's gloo-only pattern: gloo's tags separate the messages, NCCL's posting order does not."""
    from tests.test_comm_counted import all_to_all_beside_a_pending_receive
    with pytest.raises(RankError) as error:
        launch(all_to_all_beside_a_pending_receive, 2, timeout=TIMEOUT)
    text = str(error.value).split("Diagnosis from every rank's flight recorder:")[1]
    assert "rank 0 waits in recv #2 from rank 1 (float32, 2 elements)" in text, text


@pytest.mark.usefixtures("no_leftover_processes", "strict")
@pytest.mark.parametrize("world_size", [2, 3])
def test_pipeline_generation_posts_its_messages_in_an_order_nccl_can_run(world_size):
    """At p = 2 the first and last stage are one pair: stage 1 received each activation only when it needed it,
    after sending a token that stage 0 receives only after its next activations (a deadlock under NCCL's rules)."""
    from minidist.tour.inference import pp_generation
    for r, out in enumerate(launch(pp_generation, world_size, 4, timeout=TIMEOUT + 8)):
        if r == world_size - 1:
            assert torch.equal(out["tokens"], out["ref"])
