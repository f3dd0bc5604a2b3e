"""This daemon's hold on recipients in the ledger: its claims and their orphans.

A blast claims the recipients of the next few requests in one statement, which marks them
'sending': the claim is the intent to send. Claims run a bounded number of requests ahead of
their turn, so a free slot does not wait for a commit. A crash therefore leaves in doubt no
more than the requests that were in flight and those claimed ahead.

A claim whose commit this daemon never heard back (PostgreSQL went away after committing)
leaves rows owned under a token no run works on: `release_orphans` finds those while the daemon
runs and puts them back to 'pending'. No request ever left for them: a request leaves only
after its claim returned, and its recipients stay in `live` until their outcome is queued for
writing.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from blastd import ledger
from blastd.batches import BatchWriter
from blastd.resources import Db


class Claims:
    """The tokens this daemon claims under, and the recipients it works on."""

    def __init__(self, db: Db, owner: str) -> None:
        self._db = db
        self._owner = owner
        # Tokens grow from this process's start time: a predecessor's are all smaller, so the
        # sweep never mistakes its rows (settled by the start-up recovery) for ours.
        self.first_token = time.time_ns()
        self._last_token = self.first_token - 1
        self.live: set[int] = set()
        self.claiming: set[int] = set()  # tokens whose claim has not answered yet

    def new_token(self) -> int:
        """A token for the next claim; it counts as claiming until `hold`."""
        self._last_token += 1
        self.claiming.add(self._last_token)
        return self._last_token

    def hold(self, token: int, ids: Sequence[int]) -> None:
        """The claim under `token` answered with `ids`: work on them."""
        self.live.update(ids)
        self.claiming.discard(token)

    def let_go(self, ids: Sequence[int]) -> None:
        """Forget recipients whose outcome is queued for writing (or that were taken away)."""
        self.live.difference_update(ids)

    async def release_orphans(self, outcomes: BatchWriter[ledger.Outcome]) -> int:
        """Put back to 'pending' what this daemon claimed and no longer works on."""
        live, claiming, last_token = list(self.live), list(self.claiming), self._last_token
        # Outcomes queued before the snapshot are written first: their rows are not orphans.
        await outcomes.synced()
        tokens = (self.first_token, last_token)
        return await self._db(ledger.release_orphans, self._owner, tokens, live, claiming)
