"""This daemon's hold on recipients in the ledger: reservations, intents to send, orphans.

A blast reserves pending recipients under a token (they stay 'pending', owned by this
instance), then marks each request's recipients 'sending' shortly before the request leaves
(a bounded number of requests ahead, so a free slot does not wait for the commit). The marks
of every request queued while the previous mark was being committed go out in one statement,
so intents cost one commit per few milliseconds, not one per message. A crash therefore leaves
in doubt no more than the requests that were in flight and those marked ahead.

A reservation or an intent whose commit this daemon never heard back (PostgreSQL went away
after committing) leaves rows owned under a token no run works on: `release_orphans` finds
those while the daemon runs and puts them back to 'pending'. No request ever left for them: a
request leaves only after its mark returned, and its recipients stay in `live` until their
outcome is queued for writing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from blastd import ledger
from blastd.batches import BatchWriter
from blastd.resources import Db


class Claims:
    """The tokens this daemon reserves under, the recipients it works on, and their intents."""

    def __init__(self, db: Db, owner: str) -> None:
        self._db = db
        self._owner = owner
        # Tokens grow from this process's start time: a predecessor's are all smaller, so the
        # sweep never mistakes its rows (settled by the start-up recovery) for ours.
        self.first_token = time.time_ns()
        self._last_token = self.first_token - 1
        self.live: set[int] = set()
        self.reserving: set[int] = set()  # tokens whose reservation has not answered yet
        self._ids: list[int] = []
        self._tokens: list[int] = []
        self._marked: asyncio.Future[set[int]] = asyncio.get_running_loop().create_future()
        self._has_intents = asyncio.Event()
        self._is_closed = False

    def new_token(self) -> int:
        """A token for the next reservation; it counts as reserving until `hold`."""
        self._last_token += 1
        self.reserving.add(self._last_token)
        return self._last_token

    def hold(self, token: int, ids: Sequence[int]) -> None:
        """The reservation under `token` answered with `ids`: work on them."""
        self.live.update(ids)
        self.reserving.discard(token)

    def let_go(self, ids: Sequence[int]) -> None:
        """Forget recipients whose outcome is queued for writing (or that were taken away)."""
        self.live.difference_update(ids)

    async def mark_sending(self, ids: Sequence[int], token: int) -> set[int]:
        """Commit the intent for one request's recipients; return the ids that may be sent."""
        self._ids.extend(ids)
        self._tokens.extend([token] * len(ids))
        self._has_intents.set()
        marked = await asyncio.shield(self._marked)
        return marked.intersection(ids)

    def close(self) -> None:
        """Commit what is queued, then let run() return."""
        self._is_closed = True
        self._has_intents.set()

    async def run(self) -> None:
        """Commit queued intents, all that queued meanwhile in one statement, until closed."""
        while not (self._is_closed and not self._ids):
            if not self._ids:
                self._has_intents.clear()
                if not self._is_closed:
                    await self._has_intents.wait()
                continue
            ids, tokens, done = self._ids, self._tokens, self._marked
            self._ids, self._tokens = [], []
            self._marked = asyncio.get_running_loop().create_future()
            try:
                marked = await self._db(ledger.mark_sending, self._owner, ids, tokens)
            except BaseException as exc:
                done.set_exception(exc)
                raise
            done.set_result(set(marked))

    async def release_orphans(self, outcomes: BatchWriter[ledger.Outcome]) -> int:
        """Put back to 'pending' what this daemon reserved and no longer works on."""
        live, reserving, last_token = list(self.live), list(self.reserving), self._last_token
        # Outcomes queued before the snapshot are written first: their rows are not orphans.
        await outcomes.synced()
        tokens = (self.first_token, last_token)
        return await self._db(ledger.release_orphans, self._owner, tokens, live, reserving)
