-- Demonstrations (InstructGPT's step 1, from live chat): a user edits an answer into the one
-- they wanted. The edit is a sibling of the answer it was edited from (same parent), written
-- by a person rather than by a policy, and the store also records the comparison "the edit is
-- better than the original" by that user. Editing one's own question is a sibling user
-- message: a new branch, answered like any turn.

-- author_id: the person who wrote this message's text when it is an edit (a demonstration, or
-- an edited question). NULL: written the ordinary way (a user's turn by the conversation's
-- user, an answer by the policy in model_version).
-- edited_from: the message this one was edited from (a sibling: same parent). The original is
-- kept; deleting it leaves the edit, which no longer says where it came from.
ALTER TABLE messages
    ADD COLUMN author_id   bigint REFERENCES users(id) ON DELETE CASCADE,
    ADD COLUMN edited_from uuid REFERENCES messages(id) ON DELETE SET NULL;

-- An answer is written either by a policy (model_version) or by a person (author_id), never
-- neither: feedback on it must be attributable. 0001's check asked for model_version alone.
ALTER TABLE messages DROP CONSTRAINT messages_check;
ALTER TABLE messages ADD CONSTRAINT messages_answer_has_a_writer
    CHECK (role <> 'assistant' OR model_version IS NOT NULL OR author_id IS NOT NULL);
-- An edit says who wrote it.
ALTER TABLE messages ADD CONSTRAINT messages_edit_has_an_author
    CHECK (edited_from IS NULL OR author_id IS NOT NULL);

-- Retraining reads every demonstration of a round (feedback/training_data.demonstrations).
CREATE INDEX messages_demonstrations ON messages (created_at)
    WHERE role = 'assistant' AND author_id IS NOT NULL;
CREATE INDEX messages_edited_from ON messages (edited_from) WHERE edited_from IS NOT NULL;
