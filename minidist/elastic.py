"""What a torchrun worker needs beyond launch.py: fresh rendezvous keys for every attempt, numbered alike on every
node (attempt_store), and a failure said in one line (report_failure).

torchrun's agents share one TCPStore with their workers (TORCHELASTIC_USE_AGENT_STORE) and keep it for the whole job,
restarts included. A worker's process group publishes its address under fixed keys of that store; after a restart,
a worker that reads a key before its new peer has rewritten it connects to the dead peer's address: "Gloo
connectFullMesh failed ... Connection refused" (pytorch issues 135712, 147064). Prefixing the keys with the attempt
fixes it only if every worker computes the same prefix.

TORCHELASTIC_RESTART_COUNT does not qualify on several nodes: each agent counts its own restarts, and only those it
decided after a failure of its own workers. The agent whose rank was killed counts one; the agent whose healthy
rank was stopped because a new rendezvous round began ("num_nodes_waiting") counts none. Its worker, with prefix 0,
reads the addresses of attempt 0 and connects to the dead rank ("Connection refused": one more restart, which
--max-restarts may not allow), or waits for peers that publish under prefix 1 until the process group times out.
(On one node one agent counts for all its workers, so the count agreed.)

The number is therefore taken from the store itself, in two steps:

    rank 0        epoch = add("count", 1)                    a number no attempt had before
                  set("current", f"{epoch} {world_size}")
    rank r > 0    last = the epoch rank r joined before (add("joined-by-r", 0): 0 if never)
                  wait until "current" holds an epoch > last, for this world size; then record it as joined

Rank r of attempt k joined epoch e(k-1) in attempt k-1, and "current" holds e(k-1) until rank 0 of attempt k
publishes e(k): no worker of attempt k-1 is alive by then, so nobody publishes anything else meanwhile. A world size
that changed between attempts (an elastic job) marks an epoch published for another world as not ours. What this
cannot tell apart: a rank killed between reading the epoch and recording it (a few microseconds) joins one epoch
late in the next attempt; its process group then times out, and the attempt after that agrees again.

A failure in one line. When one rank dies, every other rank's next collective raises ("Connection closed by peer",
"Connection reset by peer", or a timeout if it hung): a successful restart used to print some 30 lines of gloo
tracebacks per surviving rank, and looked like a crash. Such an error is the peer's, not this rank's: it is said in
one line, its traceback appended to error-RANK.txt in the flight directory. Any other error (this rank's own) keeps
its traceback on stderr as well.
"""
import os
import re
import sys
import time
import traceback

import torch.distributed as dist

PEER_GONE = re.compile(r"Connection (closed|reset) by peer|Broken pipe|Connection refused|Timed out waiting|"
                       r"Application timeout|communicator was aborted")

KEY = "minidist-epoch"


def attempt_store(store, rank: int, world_size: int, timeout: float):
    """`store` (torchrun's shared one) under a prefix that is new for this attempt and the same on every rank."""
    if rank == 0:
        epoch = store.add(f"{KEY}/count", 1)
        store.set(f"{KEY}/current", f"{epoch} {world_size}")
    else:
        last, deadline = store.add(f"{KEY}/joined-by-{rank}", 0), time.monotonic() + timeout
        while True:
            epoch, world = map(int, store.get(f"{KEY}/current").decode().split())  # get waits for the first one
            if epoch > last and world == world_size:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank {rank}: rank 0 of this torchrun attempt did not publish a new rendezvous "
                                   f"epoch within {timeout:g} s (the last is {epoch}, for {world} ranks; rank {rank} "
                                   f"joined {last} before)")
            time.sleep(0.02)
        store.add(f"{KEY}/joined-by-{rank}", epoch - last)
    return dist.PrefixStore(f"minidist-attempt-{epoch}", store)


def report_failure(error: BaseException, rank: int, directory: str) -> None:
    """Say on stderr, in one line, why this torchrun worker stops (with the traceback too when the error is its own),
    and append the traceback to DIRECTORY/error-RANK.txt."""
    text = "".join(traceback.format_exception(error))
    path = os.path.join(directory, f"error-{rank}.txt")
    with open(path, "a") as f:
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        f.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')}, this agent's torchrun attempt {attempt}\n{text}")
    first = next((line for line in str(error).splitlines() if line.strip()), "")
    first = re.sub(r"^\[[^\]]*\]\s*", "", first)[:200]  # gloo's "[.../pair.cc:553] " prefix
    where = f"traceback in {path}; every rank's flight record: python -m minidist diagnose {directory}"
    if PEER_GONE.search(text):
        print(f"minidist: rank {rank} stops: a peer rank died or hung ({type(error).__name__}: {first}); {where}",
              file=sys.stderr, flush=True)
    else:
        print(f"{text}minidist: rank {rank} failed ({type(error).__name__}: {first}); {where}", file=sys.stderr,
              flush=True)
