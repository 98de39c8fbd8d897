-- The roster: the profiles ("girls") the bots present, each Telegram user's favourites per bot,
-- and the users each bot has seen. girls_manager.py validates every value before it gets here;
-- the checks below keep the table sane against any other writer.
--
-- Search is a plain ILIKE scan over name, bio and tags: fast enough for thousands of profiles,
-- and it needs no contrib extension (pg_trgm may not be installed).

CREATE TABLE dims_girls (
    id         bigserial PRIMARY KEY,
    name       text NOT NULL CHECK (char_length(name) BETWEEN 1 AND 64 AND name = btrim(name)),
    bio        text NOT NULL DEFAULT '' CHECK (char_length(bio) <= 1000),
    tags       text[] NOT NULL DEFAULT '{}'
               CHECK (cardinality(tags) <= 10
                      AND array_position(tags, NULL) IS NULL
                      AND array_to_string(tags, ' ') ~ '^([a-z0-9_-]{1,32}( |$))*$'),
    photo      text CHECK (photo <> ''),
    visible    boolean NOT NULL DEFAULT true,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Names are unique case-insensitively; this index also serves lookups by name and the roster
-- order (lower(name), id).
CREATE UNIQUE INDEX dims_girls_name_key ON dims_girls (lower(name));
-- A bot with roster_tags presents the visible profiles carrying one of them (tags && ...).
CREATE INDEX dims_girls_tags ON dims_girls USING gin (tags);

CREATE TABLE dims_favourites (
    bot        text NOT NULL,
    user_id    bigint NOT NULL,
    girl_id    bigint NOT NULL REFERENCES dims_girls (id) ON DELETE CASCADE,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (bot, user_id, girl_id)
);

-- For the cascade when a profile is deleted.
CREATE INDEX dims_favourites_girl ON dims_favourites (girl_id);

CREATE TABLE dims_users (
    bot        text NOT NULL,
    user_id    bigint NOT NULL,
    username   text,
    first_name text,
    first_seen timestamptz NOT NULL DEFAULT now(),
    last_seen  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (bot, user_id)
);
