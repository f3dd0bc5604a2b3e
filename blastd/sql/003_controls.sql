-- Control jobs applied, by the producer's job id: a control pushed twice is applied once. The
-- row is written in the transaction that applies the control, so it can neither be applied
-- without its record nor recorded without being applied.
CREATE TABLE controls (
    id           text PRIMARY KEY,   -- the control job's id (idempotency key)
    campaign_id  text NOT NULL REFERENCES campaigns (id) ON DELETE CASCADE,
    action       text NOT NULL,
    applied_at   timestamptz NOT NULL DEFAULT now()
);
