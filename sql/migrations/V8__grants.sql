-- V8: least privilege. The functions stop connecting as the owner: an app role that reads and
-- writes rows, and a read-only role. The roles are created outside migrations (they are
-- cluster-wide, and managed databases create them): by `migrate --roles`, the runner, the test
-- harness, or the platform. What they may do is granted by sql/grants.sql, which the migrator
-- applies after every run, so a restored dump without grants is repaired by the next run.
--
-- Nobody but the owner creates objects in the schema. PostgreSQL 15 already revokes this from
-- PUBLIC; older servers granted it. Where the migrator does not own the schema the REVOKE
-- is only a warning, so check that it holds.
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
DO $$
BEGIN
    IF has_schema_privilege('public', 'public', 'CREATE') THEN
        RAISE EXCEPTION 'PUBLIC may still CREATE in schema public: revoke it as the schema''s owner (REVOKE CREATE ON SCHEMA public FROM PUBLIC), then migrate again';
    END IF;
END $$;
