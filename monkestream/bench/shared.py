"""What the publisher and the reader processes share: per-seq arrays in anonymous shared memory.

The maps are made before the readers fork, so every process sees the same
pages; nothing is pickled or copied per event.
"""

from __future__ import annotations

import mmap


class Shared:
    """Arrays indexed by seq, written by one side and read by the other."""

    def __init__(self, max_events: int) -> None:
        self._maps = [mmap.mmap(-1, 8 * max_events), mmap.mmap(-1, max_events),
                      mmap.mmap(-1, 8 * max_events), mmap.mmap(-1, 8)]
        sent, conn_of, id_of, acked = self._maps
        self.sent = memoryview(sent).cast("d")  # publisher: when each seq's POST was sent
        self.conn_of = memoryview(conn_of)  # publisher: the connection that sent it
        self.id_of = memoryview(id_of).cast("q")  # readers: the number in the event id the server gave it
        self.acked = memoryview(acked).cast("q")  # publisher: [0] = every seq up to it has been answered

    def close(self) -> None:
        for view in (self.sent, self.conn_of, self.id_of, self.acked):
            view.release()
        for m in self._maps:
            m.close()
