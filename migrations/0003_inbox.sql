-- The durable inbox: every update a bot fetches is stored here before its offset is confirmed
-- to Telegram, and marked done only when its handler has finished.

CREATE TABLE dims_inbox (
    bot_id      bigint NOT NULL,                -- Telegram's id of the bot (the token's digits)
    update_id   bigint NOT NULL,
    bot         text NOT NULL,                  -- the DIMS bot name, for operators
    payload     jsonb NOT NULL,
    status      text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'done', 'dead')),
    attempts    integer NOT NULL DEFAULT 0,
    error       text,
    received_at timestamptz NOT NULL DEFAULT now(),
    done_at     timestamptz,
    PRIMARY KEY (bot_id, update_id)
);

CREATE INDEX dims_inbox_pending ON dims_inbox (bot_id, update_id) WHERE status = 'pending';
CREATE INDEX dims_inbox_done_at ON dims_inbox (done_at) WHERE status = 'done';
