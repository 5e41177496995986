-- Blue/green for remote engines: which URL the servers' remote engine should send new requests
-- to, who asked for it, when and why, and how each replica's switch went.
--
-- Append-only. An operator's request (`python -m deploy engine-url URL`) is a row with action
-- 'switch'; what a replica should use is the newest 'switch' row naming it or naming every
-- replica (replica NULL), so a later switch of every replica overrides older per-replica ones.
-- Replicas append 'switched' (they verified the URL and new requests go there) or
-- 'switch_failed' (the URL did not answer or lacks a served version; the old one kept serving),
-- with `request_id` pointing at the 'switch' row they acted on.
CREATE TABLE engine_endpoint_events (
    id          bigserial PRIMARY KEY,
    action      text NOT NULL CHECK (action IN ('switch', 'switched', 'switch_failed')),
    replica     text,  -- 'switch': the replica it is for (NULL: every one); else the replica reporting
    url         text NOT NULL,
    actor       text NOT NULL,
    reason      text,  -- 'switch': the operator's why; 'switch_failed': what went wrong
    request_id  bigint REFERENCES engine_endpoint_events(id) ON DELETE CASCADE,
    details     jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at  timestamptz NOT NULL DEFAULT now()
);
-- The desired endpoints are read on every (re)connect and notification: newest request per replica.
CREATE INDEX engine_endpoint_events_requests ON engine_endpoint_events (replica, id DESC)
    WHERE action = 'switch';
