-- What the app and read-only roles may do, applied by the migrator after every run (not a
-- migration: a restore of a dump without grants, or a renamed role, is repaired by the next
-- `migrate`). GRANT is idempotent. The role names come from the migrator's session settings
-- tally.app_role and tally.readonly_role. A table an older schema does not have yet is skipped.
--
-- Rule: a migration that adds a table, view or sequence adds its line here in the same commit.
DO $$
DECLARE
    app text := nullif(current_setting('tally.app_role', true), '');
    ro  text := nullif(current_setting('tally.readonly_role', true), '');
    g record;
BEGIN
    IF app IS NULL OR ro IS NULL THEN
        RAISE EXCEPTION 'tally.app_role and tally.readonly_role are not set: run the migrate command (it names the roles to grant)';
    END IF;
    EXECUTE format('GRANT USAGE ON SCHEMA public TO %I, %I', app, ro);
    FOR g IN SELECT * FROM (VALUES
        -- The read-only role: the catalog and the orders (list-products, get-order, list-orders).
        ('products', 'SELECT', ro), ('inventory_shards', 'SELECT', ro), ('catalog', 'SELECT', ro),
        ('orders', 'SELECT', ro), ('order_items', 'SELECT', ro),
        -- The app role: rows only. Products are never deleted (V7's triggers say so as well),
        -- the ledger is append-only (V1's trigger), users are only read.
        ('users', 'SELECT', app), ('catalog', 'SELECT', app),
        ('products', 'SELECT, INSERT, UPDATE', app),
        ('orders', 'SELECT, INSERT, UPDATE', app),
        ('order_items', 'SELECT, INSERT, UPDATE', app),
        ('inventory_movements', 'SELECT, INSERT', app),
        ('inventory_shards', 'SELECT, INSERT, UPDATE, DELETE', app),
        ('idempotency_keys', 'SELECT, INSERT, UPDATE, DELETE', app),
        -- V10, V11: the triggers write rows as the outbox's owner (no role may insert one, so
        -- none can forge an event); the publisher and the sweep read and delete them.
        ('outbox', 'SELECT, DELETE', app)
    ) AS t (relation, privileges, grantee)
    LOOP
        IF to_regclass(g.relation) IS NOT NULL THEN
            EXECUTE format('GRANT %s ON %I TO %I', g.privileges, g.relation, g.grantee);
        END IF;
    END LOOP;
    EXECUTE format('GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO %I', app);
    -- V9's SECURITY DEFINER function: both roles resolve (and provision) token subjects.
    IF to_regprocedure('user_for_subject(text, boolean)') IS NOT NULL THEN
        EXECUTE format('GRANT EXECUTE ON FUNCTION user_for_subject(text, boolean) TO %I, %I', app, ro);
    END IF;
END $$;
