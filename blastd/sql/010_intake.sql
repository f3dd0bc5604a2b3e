-- A campaign taken in from a producer's list is committed with its first page of recipients,
-- so sending starts while the rest is still taken in; each later page commits on its own.
--   intake_complete  false while pages are still to come: the campaign cannot be done then.
--   intake_seq       the seq the next page starts at. A page commits with this moved past it,
--                    so a page is in the ledger once, and a restart carries on from here.
--   intake_length    how many entries the producer's list held when the intake began.
-- Campaigns committed whole (and every campaign from before this) are complete.
ALTER TABLE campaigns
    ADD COLUMN intake_complete  boolean NOT NULL DEFAULT true,
    ADD COLUMN intake_seq       integer NOT NULL DEFAULT 0,
    ADD COLUMN intake_length    integer;
