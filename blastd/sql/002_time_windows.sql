-- Sending windows in the recipient's local time. The zone is filled at intake, from the number
-- (libphonenumber's time zone data), only for campaigns that have a window: the others keep
-- NULL and pay nothing for it.
ALTER TABLE recipients ADD COLUMN time_zone text;  -- IANA name, e.g. 'Asia/Jakarta'

-- Claims of a windowed campaign take the pending recipients of the zones open now, in order;
-- the same index lists a campaign's pending zones with one probe per zone.
CREATE INDEX recipients_pending_by_zone ON recipients (campaign_id, time_zone, id)
    WHERE state = 'pending' AND time_zone IS NOT NULL;
