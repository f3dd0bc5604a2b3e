-- Status broadcasts (docs/status.md): one row per campaign of type 'status'. The
-- recipients rows are the contacts, in send order (seq: the anchor first); this row holds what
-- a restart needs to carry on with the same status: the anchor's message id and the batch size
-- the gateway still accepts.
CREATE TABLE broadcasts (
    campaign_id       text PRIMARY KEY REFERENCES campaigns (id) ON DELETE CASCADE,
    contacts          integer NOT NULL,            -- contacts to reach; picked the batch size
    batch_size        integer NOT NULL,            -- contacts per resend; lowered on "too large"
    message_id        text,                        -- the anchor's status id, resent to the rest
    anchor_id         bigint,                      -- the recipients row of the anchor contact
    batches_accepted  integer NOT NULL DEFAULT 0,  -- requests the gateway took, anchor included
    batches_failed    integer NOT NULL DEFAULT 0,  -- requests it refused (every attempt counts)
    updated_at        timestamptz NOT NULL DEFAULT now()
);
