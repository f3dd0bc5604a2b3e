-- A recipient's state only moves forward. The rule is written once, here: every statement that
-- changes a state filters with blastd_may_move, and the trigger below refuses any other move,
-- so no code path (ours, a future one, an operator's psql) can undo a fact.
--
--   pending    -> sending, rendering, expired, cancelled
--   sending    -> pending (released, deferred), sent, delivered, read, failed, uncertain
--   sent       -> delivered, read, failed (the provider's own report that it could not deliver)
--   delivered  -> read
--   failed     -> pending, rendered (an operator's retry), sent, delivered, read (a receipt:
--                 evidence of delivery wins over a local failure)
--   uncertain  -> pending, rendered (resent after doubt), sent, delivered, read, failed
--   rendering  -> pending, rendered, video_failed, cancelled
--   rendered   -> sending, cancelled
--   video_failed -> pending (an operator's retry)
--   read, skipped, cancelled, expired: final.
CREATE FUNCTION blastd_may_move(from_state text, to_state text) RETURNS boolean
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$ SELECT from_state = to_state OR to_state = ANY (CASE from_state
        WHEN 'pending' THEN ARRAY['sending', 'rendering', 'expired', 'cancelled']
        WHEN 'sending' THEN ARRAY['pending', 'sent', 'delivered', 'read', 'failed', 'uncertain']
        WHEN 'sent' THEN ARRAY['delivered', 'read', 'failed']
        WHEN 'delivered' THEN ARRAY['read']
        WHEN 'failed' THEN ARRAY['pending', 'rendered', 'sent', 'delivered', 'read']
        WHEN 'uncertain' THEN ARRAY['pending', 'rendered', 'sent', 'delivered', 'read', 'failed']
        WHEN 'rendering' THEN ARRAY['pending', 'rendered', 'video_failed', 'cancelled']
        WHEN 'rendered' THEN ARRAY['sending', 'cancelled']
        WHEN 'video_failed' THEN ARRAY['pending']
        ELSE ARRAY[]::text[] END) $$;

-- What a report must say besides the state:
--   possible_duplicate       sent again after doubt: the number may have it twice
--   delivered_after_failure  the provider reported it sent or delivered after we recorded it
--                            failed or uncertain
-- receipt_at: when the first receipt for it came; with provider_message_id, the evidence of a
-- send that keeps an operator's retry away from it.
-- doubt_since: when it became uncertain; NULL once reconciliation has decided (held for an
-- operator). A campaign is not done while a recipient waits for that decision.
ALTER TABLE recipients
    ADD COLUMN flags        text[] NOT NULL DEFAULT '{}',
    ADD COLUMN receipt_at   timestamptz,
    ADD COLUMN doubt_since  timestamptz;

CREATE INDEX recipients_in_doubt ON recipients (doubt_since)
    WHERE state = 'uncertain' AND doubt_since IS NOT NULL;

CREATE FUNCTION blastd_guard_state() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NOT blastd_may_move(OLD.state, NEW.state) THEN
        RAISE EXCEPTION 'recipient % may not move from % to %', OLD.id, OLD.state, NEW.state
            USING ERRCODE = 'check_violation';
    END IF;
    IF NEW.state IN ('sent', 'delivered', 'read') THEN
        -- The error of an earlier attempt is not this recipient's fate any more.
        NEW.error_class := NULL;
        NEW.error_code := NULL;
        NEW.error_text := NULL;
        IF OLD.state IN ('failed', 'uncertain')
           AND NOT 'delivered_after_failure' = ANY (NEW.flags) THEN
            NEW.flags := NEW.flags || 'delivered_after_failure'::text;
        END IF;
    END IF;
    NEW.doubt_since := CASE WHEN NEW.state = 'uncertain' THEN now() END;
    RETURN NEW;
END $$;

-- Only rows whose state changes pay for the check, and not the three moves of every send
-- (claim, release, a clean 'sent' answer): they are allowed, and the function would change
-- nothing in them. The WHEN clause costs no function call; the function call cost a fifth of
-- the ledger's time per recipient when every claim and answer paid it.
CREATE TRIGGER recipients_forward_only BEFORE UPDATE OF state ON recipients
    FOR EACH ROW WHEN (OLD.state IS DISTINCT FROM NEW.state AND NOT (
        (OLD.state = 'pending' AND NEW.state = 'sending')
        OR (OLD.state = 'sending' AND NEW.state = 'pending' AND NEW.doubt_since IS NULL)
        OR (OLD.state = 'sending' AND NEW.state = 'sent' AND NEW.doubt_since IS NULL
            AND NEW.error_class IS NULL AND NEW.error_code IS NULL AND NEW.error_text IS NULL)))
    EXECUTE FUNCTION blastd_guard_state();
