-- Meta caps how many unique people an account (or a business portfolio) may message in a
-- rolling 24 hours. The budget left is counted from recipients messaged within the window.
CREATE INDEX recipients_messaged_at ON recipients (updated_at)
    WHERE state IN ('sent', 'delivered', 'read');
