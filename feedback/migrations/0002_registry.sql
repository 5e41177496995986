-- The deploy registry's own state, beyond the checkpoints table itself.

-- One row: is the serving policy pinned (no automatic promotion until unpinned), by whom, why.
CREATE TABLE deploy_state (
    id          boolean PRIMARY KEY DEFAULT true CHECK (id),
    pinned_id   text REFERENCES checkpoints(id),
    pinned_by   text,
    pinned_at   timestamptz,
    pin_reason  text
);
INSERT INTO deploy_state (id) VALUES (true);

-- At most one canary at a time (as at most one serving): its share of new conversations is
-- checkpoints.canary_percent.
CREATE UNIQUE INDEX checkpoints_one_canary ON checkpoints ((true)) WHERE status = 'canary';

-- The version a conversation was assigned when it started, so it keeps it while a canary runs
-- even when the canary's share changes. NULL: not assigned (conversations before 0002, or
-- assigned only by hash).
ALTER TABLE conversations ADD COLUMN model_version text;

-- Rollback replays the history of what served, newest first.
CREATE INDEX checkpoint_events_action ON checkpoint_events (action, id);
