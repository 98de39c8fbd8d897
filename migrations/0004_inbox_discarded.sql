-- An operator may discard a dead update (inbox_discard): it leaves the dead list, is never
-- handled, and is pruned like a done row (its done_at is when it was discarded).

ALTER TABLE dims_inbox DROP CONSTRAINT dims_inbox_status_check,
    ADD CONSTRAINT dims_inbox_status_check CHECK (status IN ('pending', 'done', 'dead', 'discarded'));

DROP INDEX dims_inbox_done_at;
CREATE INDEX dims_inbox_finished_at ON dims_inbox (done_at) WHERE status IN ('done', 'discarded');

-- inbox_list, inbox_retry and inbox_discard find a bot's updates by its DIMS name.
CREATE INDEX dims_inbox_bot_status ON dims_inbox (bot, status) WHERE status <> 'done';
