-- Flywheel's store: who chatted, what was said (a tree of messages), what they thought of it,
-- which policy wrote it, and what retraining and deploy did about it.

-- An API user or a browser. The token is never stored, only its SHA-256.
CREATE TABLE users (
    id          bigserial PRIMARY KEY,
    token_hash  bytea NOT NULL UNIQUE CHECK (octet_length(token_hash) = 32),
    name        text,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE conversations (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id         bigint NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    title           text NOT NULL DEFAULT '',
    -- false: never used for training (read by every retraining query).
    allow_data_use  boolean NOT NULL DEFAULT true,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX conversations_user_recent ON conversations (user_id, updated_at DESC);

-- Messages form a tree: a regeneration is a sibling of the answer it replaces (same parent).
CREATE TABLE messages (
    id                 uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    conversation_id    uuid NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    parent_id          uuid REFERENCES messages(id) ON DELETE CASCADE,
    role               text NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
    content            text NOT NULL,
    -- The checkpoint id that wrote an assistant message, so feedback is attributable to a policy.
    model_version      text,
    prompt_tokens      integer CHECK (prompt_tokens >= 0),
    completion_tokens  integer CHECK (completion_tokens >= 0),
    -- 'stop' (end of turn), 'length' (hit max_new_tokens), 'cancelled', 'error'.
    finish_reason      text,
    params             jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at         timestamptz NOT NULL DEFAULT clock_timestamp(),
    CHECK (role <> 'assistant' OR model_version IS NOT NULL)
);
CREATE INDEX messages_conversation ON messages (conversation_id, created_at);
CREATE INDEX messages_parent ON messages (parent_id);
CREATE INDEX messages_version ON messages (model_version) WHERE role = 'assistant';

-- The current vote of a user on a message (one row per user and message, overwritten on change).
-- Every change is also appended to rating_changes, so history is kept without ambiguity
-- about which vote counts.
CREATE TABLE ratings (
    id          bigserial PRIMARY KEY,
    message_id  uuid NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    user_id     bigint NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    rating      smallint NOT NULL CHECK (rating IN (-1, 1)),
    reason      text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (user_id, message_id)
);
CREATE INDEX ratings_message ON ratings (message_id);
CREATE INDEX ratings_updated ON ratings (updated_at);

CREATE TABLE rating_changes (
    id          bigserial PRIMARY KEY,
    rating_id   bigint NOT NULL REFERENCES ratings(id) ON DELETE CASCADE,
    rating      smallint NOT NULL CHECK (rating IN (-1, 1)),
    reason      text,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX rating_changes_rating ON rating_changes (rating_id);

-- "message_id is <verdict> than other_id": two sibling assistant answers. One current verdict
-- per user and unordered pair; a later verdict on the same pair replaces it.
CREATE TABLE comparisons (
    id          bigserial PRIMARY KEY,
    message_id  uuid NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    other_id    uuid NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    user_id     bigint NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    verdict     text NOT NULL CHECK (verdict IN ('better', 'worse', 'same')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    CHECK (message_id <> other_id)
);
CREATE UNIQUE INDEX comparisons_one_per_pair
    ON comparisons (user_id, LEAST(message_id, other_id), GREATEST(message_id, other_id));
CREATE INDEX comparisons_message ON comparisons (message_id);
CREATE INDEX comparisons_other ON comparisons (other_id);
CREATE INDEX comparisons_updated ON comparisons (updated_at);

-- A policy: the base model (kind 'full', no parent) or a trained adapter / full fine-tune.
CREATE TABLE checkpoints (
    id           text PRIMARY KEY,
    parent_id    text REFERENCES checkpoints(id),
    path         text NOT NULL,
    base_model   text NOT NULL,
    kind         text NOT NULL CHECK (kind IN ('lora', 'full')),
    status       text NOT NULL DEFAULT 'candidate'
                 CHECK (status IN ('candidate', 'canary', 'serving', 'retired', 'rejected')),
    canary_percent real CHECK (canary_percent > 0 AND canary_percent <= 100),
    metrics      jsonb NOT NULL DEFAULT '{}'::jsonb,
    config       jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at   timestamptz NOT NULL DEFAULT now(),
    promoted_at  timestamptz,
    promoted_by  text,
    reason       text
);
-- At most one policy serves at a time.
CREATE UNIQUE INDEX checkpoints_one_serving ON checkpoints ((true)) WHERE status = 'serving';
CREATE INDEX checkpoints_status ON checkpoints (status, created_at DESC);

-- Every registry change: who did what to which checkpoint, when and why.
CREATE TABLE checkpoint_events (
    id             bigserial PRIMARY KEY,
    checkpoint_id  text NOT NULL REFERENCES checkpoints(id) ON DELETE CASCADE,
    action         text NOT NULL,
    actor          text NOT NULL,
    reason         text,
    details        jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX checkpoint_events_checkpoint ON checkpoint_events (checkpoint_id, created_at);

-- One retraining round.
CREATE TABLE retrain_runs (
    id             bigserial PRIMARY KEY,
    status         text NOT NULL DEFAULT 'running'
                   CHECK (status IN ('running', 'succeeded', 'rejected', 'failed', 'skipped')),
    trigger        text NOT NULL DEFAULT 'manual',
    started_at     timestamptz NOT NULL DEFAULT now(),
    finished_at    timestamptz,
    counts         jsonb NOT NULL DEFAULT '{}'::jsonb,
    metrics        jsonb NOT NULL DEFAULT '{}'::jsonb,
    timings        jsonb NOT NULL DEFAULT '{}'::jsonb,
    candidate_id   text REFERENCES checkpoints(id),
    error          text
);
CREATE INDEX retrain_runs_started ON retrain_runs (started_at DESC);
