-- Core tables the supervisor needs: every bot's desired state, and the event log of starts,
-- exits, restarts and state changes.

CREATE TABLE dims_bots (
    name          text PRIMARY KEY CHECK (name ~ '^[a-z0-9_-]{1,32}$'),
    desired_state text NOT NULL DEFAULT 'running' CHECK (desired_state IN ('running', 'stopped')),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE dims_events (
    id         bigserial PRIMARY KEY,
    at         timestamptz NOT NULL DEFAULT now(),
    bot        text,                       -- NULL: the supervisor itself
    kind       text NOT NULL,              -- start, ready, exit, restart, state, fatal, reload, ...
    state_from text,
    state_to   text,
    pid        integer,
    message    text NOT NULL DEFAULT '',
    detail     jsonb NOT NULL DEFAULT '{}'::jsonb
);

CREATE INDEX dims_events_bot_at ON dims_events (bot, at DESC);
