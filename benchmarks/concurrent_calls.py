"""Many calls released at once on their own threads, timed from the release to the last one's end."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


def concurrently(fn: Callable[[int], int], n: int) -> tuple[float, int]:
    """fn(i) -> tokens, for i in range(n) at once; (seconds, tokens). Raises the first error once all end."""
    counts = [0] * n
    errors: list[BaseException] = []
    barrier = threading.Barrier(n + 1)

    def one(i: int) -> None:
        barrier.wait()
        try:
            counts[i] = fn(i)
        except BaseException as exc:  # reported after the run
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return seconds, sum(counts)


def streamed_tokens(chunks) -> int:
    """How many token ids a GenerateStream call delivered."""
    return sum(len(chunk.token_ids) for chunk in chunks)
