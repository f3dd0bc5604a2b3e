-- A claim reserves pending recipients for one daemon (owner) under a token, without changing
-- their state: they become 'sending' only when their request is about to leave (the intent),
-- so a crash leaves in doubt no more than the requests that were in flight. The token tells
-- this daemon's live claims from orphans (a claim whose commit it never heard back).
ALTER TABLE recipients ADD COLUMN claim_token bigint;
