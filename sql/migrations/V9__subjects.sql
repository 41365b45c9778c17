-- V9: users from an identity provider. A token's `sub` that is not a users.id (a UUID, an
-- `auth0|...` string) names a user through users.external_id, and a user seen for the first
-- time may be created (provisioned). Expand only: a new nullable column, email no longer
-- required (nothing reads it; a provisioned user has none), and one new function. The unique
-- index on external_id is built concurrently by the migrator after this (CONCURRENT_INDEXES),
-- so adding it never blocks a write to users.
ALTER TABLE users ALTER COLUMN email DROP NOT NULL;
ALTER TABLE users ADD COLUMN external_id text;
-- NOT VALID: every existing row is NULL, so there is nothing to scan for; new rows are checked.
ALTER TABLE users ADD CONSTRAINT users_external_id_length
    CHECK (length(external_id) BETWEEN 1 AND 255) NOT VALID;

-- The user for an external subject: its id, or NULL when there is none and `p_provision` is
-- false. With `p_provision`, an unknown subject gets a user row (the caller must be in a
-- read-write transaction). SECURITY DEFINER, so the read-only role, whose first call may be a
-- GET, can provision too while it still cannot write a single row of its own. Concurrent first
-- sights of one subject serialise on an advisory lock keyed by the subject, so it gets one
-- row, and that holds before (and without) the unique index.
CREATE FUNCTION user_for_subject(p_subject text, p_provision boolean)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    v_id bigint;
BEGIN
    IF p_subject IS NULL OR length(p_subject) NOT BETWEEN 1 AND 255 THEN
        RAISE EXCEPTION 'a subject is 1 to 255 characters' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT u.id INTO v_id FROM users u WHERE u.external_id = p_subject;
    IF FOUND OR NOT p_provision THEN
        RETURN v_id;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtextextended('tally.subject:' || p_subject, 0));
    -- A new statement: it sees the row a concurrent first sight committed while we waited.
    SELECT u.id INTO v_id FROM users u WHERE u.external_id = p_subject;
    IF NOT FOUND THEN
        INSERT INTO users (external_id) VALUES (p_subject) RETURNING id INTO v_id;
    END IF;
    RETURN v_id;
END $$;
-- Only the roles sql/grants.sql names may call it.
REVOKE ALL ON FUNCTION user_for_subject(text, boolean) FROM PUBLIC;
