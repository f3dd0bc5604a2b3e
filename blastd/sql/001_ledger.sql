-- The ledger: one row per campaign, one row per recipient. Row state is the checkpoint: a
-- restart continues from the rows, never from a cursor kept elsewhere.

CREATE TABLE campaigns (
    id            text PRIMARY KEY,               -- the producer's job id (idempotency key)
    type          text NOT NULL,
    account       text NOT NULL,
    state         text NOT NULL DEFAULT 'running', -- running | paused | stopped | cancelled | done
    state_reason  text,
    message       jsonb NOT NULL,
    options       jsonb NOT NULL DEFAULT '{}',
    total         integer NOT NULL DEFAULT 0,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    finished_at   timestamptz
);

-- pending -> sending (claimed by an instance; its request may have left) -> sent -> delivered
-- -> read; or failed, skipped, cancelled, uncertain (the instance died while sending), expired.
CREATE TABLE recipients (
    id                   bigserial PRIMARY KEY,    -- the ledger id sent to providers
    campaign_id          text NOT NULL REFERENCES campaigns (id) ON DELETE CASCADE,
    seq                  integer NOT NULL,         -- position in the producer's list
    phone                text NOT NULL,            -- E.164, or the raw input when skipped
    vars                 jsonb,
    state                text NOT NULL,
    attempts             integer NOT NULL DEFAULT 0,
    owner                text,                     -- instance holding it while sending
    next_attempt_at      timestamptz,
    provider_message_id  text,
    error_class          text,
    error_code           text,
    error_text           text,
    updated_at           timestamptz NOT NULL DEFAULT now()
);

-- A number is sent at most once per campaign; duplicates are kept as 'skipped' rows.
CREATE UNIQUE INDEX recipients_one_per_number ON recipients (campaign_id, phone)
    WHERE state <> 'skipped';
CREATE INDEX recipients_pending ON recipients (campaign_id, id) WHERE state = 'pending';
CREATE INDEX recipients_owned ON recipients (owner) WHERE owner IS NOT NULL;
CREATE INDEX recipients_by_state ON recipients (campaign_id, state);
CREATE INDEX recipients_by_message_id ON recipients (provider_message_id)
    WHERE provider_message_id IS NOT NULL;

-- Receipts only move a recipient forward: sent < delivered < read.
CREATE FUNCTION blastd_state_rank(state text) RETURNS integer
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$ SELECT CASE state WHEN 'sent' THEN 1 WHEN 'delivered' THEN 2 WHEN 'read' THEN 3
                            ELSE 0 END $$;
