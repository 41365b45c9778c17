-- V8: least privilege. The functions stop connecting as the owner: the app role may read and
-- write rows (never change the schema, disable a trigger or delete a product), the read-only
-- role may only read. The roles themselves are created outside migrations (they are
-- cluster-wide, and managed databases create them): by `migrate --roles`, the runner, the test
-- harness, or the platform. Their names come from the migrator's session settings
-- tally.app_role and tally.readonly_role, so that parallel test databases use their own.
--
-- Rule for later migrations: one that adds a table, view, sequence or function grants it to
-- these roles in the same file, the same way.
DO $$
DECLARE
    app text := nullif(current_setting('tally.app_role', true), '');
    ro  text := nullif(current_setting('tally.readonly_role', true), '');
BEGIN
    IF app IS NULL OR ro IS NULL THEN
        RAISE EXCEPTION 'tally.app_role and tally.readonly_role are not set: run the migrations with the migrate command (it names the roles to grant)';
    END IF;
    -- Nobody but the owner creates objects here (PostgreSQL 15 already revokes it; older
    -- servers granted it to everyone).
    REVOKE CREATE ON SCHEMA public FROM PUBLIC;
    EXECUTE format('GRANT USAGE ON SCHEMA public TO %I, %I', app, ro);

    -- Read-only: the catalog and the order documents (list-products, get-order).
    EXECUTE format('GRANT SELECT ON users, products, inventory_shards, catalog, orders, order_items TO %I', ro);

    -- The app: orders, cancels, restocks, the processor. Rows only; products are never
    -- deleted (V7's triggers say so as well), the ledger is append-only (V1's trigger).
    EXECUTE format('GRANT SELECT ON users, catalog TO %I', app);
    EXECUTE format('GRANT SELECT, INSERT, UPDATE ON products, orders, order_items TO %I', app);
    EXECUTE format('GRANT SELECT, INSERT ON inventory_movements TO %I', app);
    EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON inventory_shards, idempotency_keys TO %I', app);
    EXECUTE format('GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO %I', app);
END $$;
