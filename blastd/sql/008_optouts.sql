-- Numbers that asked not to be written to again. Intake skips them for the message categories
-- the settings name (marketing by default). `source` says how the number got here: the
-- provider refused it as opted out, the person sent a stop keyword, or an operator added it.
CREATE TABLE optouts (
    phone       text PRIMARY KEY,              -- E.164
    source      text NOT NULL,                 -- 'provider', 'inbound', 'operator'
    reason      text,
    created_at  timestamptz NOT NULL DEFAULT now()
);
