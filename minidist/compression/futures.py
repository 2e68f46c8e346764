"""The future a communication hook returns: a torch.futures.Future, so the same hook runs on DDP and DataParallel.

DDP calls `hook(state, bucket)` during backward and, at the end of backward, waits on the returned
`torch.futures.Future` (its C++ reducer accepts nothing else), then copies the future's value, the averaged bucket,
into the gradients. torch's own hooks build that future from the collective's: `dist.all_reduce(x,
async_op=True).get_future().then(decompress)`. minidist's collectives return a minidist `Work` instead (`wait()`
gives the result; under the ring backend the collective runs on minidist's communication thread), so `then` bridges
the two: a helper thread waits for the works and completes a torch future with `finish(*their results)`, the
decompression. The hook returns at once; backward goes on computing while the bytes travel.
"""
import threading

import torch


def then(works: list, finish) -> torch.futures.Future[torch.Tensor]:
    """A torch.futures.Future whose value is finish(*[w.wait() for w in works]), set once every work has completed.

    works: what minidist's asynchronous collectives return (anything with a wait() that gives the result). finish
    runs once, on a helper thread, and must not issue collectives (they would be ordered differently on different
    ranks). If a work or finish fails, waiting on the future raises the error on the waiting thread.
    """
    future = torch.futures.Future()

    def complete():
        try:
            future.set_result(finish(*[w.wait() for w in works]))
        except BaseException as e:  # surfaced by future.wait() where the reducer (or the caller) waits
            future.set_exception(e)
    threading.Thread(target=complete, name="minidist-hook", daemon=True).start()
    return future
