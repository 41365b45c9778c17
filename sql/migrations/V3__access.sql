-- V3: access control. Idempotency keys belong to the authenticated caller (who may be an
-- admin ordering for someone else), cancellation checks the owner, and admins adjust stock.

-- idempotency_keys.user_id now holds the key's owner: the caller, not the order's user.
DROP FUNCTION place_order_keyed(bigint, bigint[], integer[], text, text);
CREATE FUNCTION place_order_keyed(p_key_owner bigint, p_user_id bigint, p_product_ids bigint[],
                                  p_quantities integer[], p_key text, p_fingerprint text)
RETURNS TABLE (outcome text, order_id bigint, body text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_stored  record;
    v_placed  record;
BEGIN
    INSERT INTO idempotency_keys (user_id, key, fingerprint)
    VALUES (p_key_owner, p_key, p_fingerprint)
    ON CONFLICT DO NOTHING;
    IF NOT FOUND THEN
        SELECT k.fingerprint, k.order_id, k.status_code, k.response_body INTO v_stored
        FROM idempotency_keys k WHERE k.user_id = p_key_owner AND k.key = p_key;
        IF v_stored.fingerprint IS DISTINCT FROM p_fingerprint THEN
            RETURN QUERY SELECT 'idempotency_key_reused', NULL::bigint, NULL::text;
        ELSIF v_stored.response_body IS NULL THEN
            RETURN QUERY SELECT 'idempotency_key_in_flight', NULL::bigint, NULL::text;
        ELSE
            RETURN QUERY SELECT 'replayed', v_stored.order_id, v_stored.response_body;
        END IF;
        RETURN;
    END IF;

    SELECT * INTO v_placed FROM place_order(p_user_id, p_product_ids, p_quantities);
    IF v_placed.outcome = 'created' THEN
        UPDATE idempotency_keys k
        SET order_id = v_placed.order_id, status_code = 201, response_body = v_placed.body
        WHERE k.user_id = p_key_owner AND k.key = p_key;
    ELSE
        DELETE FROM idempotency_keys k WHERE k.user_id = p_key_owner AND k.key = p_key;
    END IF;
    RETURN QUERY SELECT v_placed.outcome, v_placed.order_id, v_placed.body;
END $$;

-- Cancel as `p_actor` (NULL: an admin, who may cancel any order). Someone else's order is
-- 'not_found', exactly as a missing one, so its existence is not revealed.
DROP FUNCTION cancel_order(bigint);
CREATE FUNCTION cancel_order(p_order_id bigint, p_actor bigint)
RETURNS TABLE (outcome text, status text, user_id bigint, body text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_release record;
BEGIN
    IF p_actor IS NOT NULL THEN
        PERFORM 1 FROM orders o WHERE o.id = p_order_id AND o.user_id = p_actor;
        IF NOT FOUND THEN
            RETURN QUERY SELECT 'not_found', NULL::text, NULL::bigint, NULL::text;
            RETURN;
        END IF;
    END IF;
    SELECT * INTO v_release FROM release_order(p_order_id, 'CANCELLED', 'cancellation');
    RETURN QUERY
    SELECT v_release.outcome, v_release.status, d.user_id, d.body
    FROM (SELECT 1) one LEFT JOIN order_document(p_order_id) d ON true;
END $$;

-- POST /products/{id}/inventory: a relative change that never takes stock below zero, with its
-- ledger row in the same transaction. The row lock orders it with concurrent sales.
-- Outcomes: 'adjusted' (new inventory), 'not_found', 'insufficient_inventory' (current stock).
CREATE FUNCTION adjust_inventory(p_product_id bigint, p_delta bigint, p_reason text, p_note text)
RETURNS TABLE (outcome text, inventory bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_inventory bigint;
BEGIN
    SELECT p.inventory INTO v_inventory FROM products p WHERE p.id = p_product_id FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'not_found', NULL::bigint;
        RETURN;
    END IF;
    IF v_inventory + p_delta < 0 THEN
        RETURN QUERY SELECT 'insufficient_inventory', v_inventory;
        RETURN;
    END IF;
    UPDATE products p SET inventory = p.inventory + p_delta, updated_at = now()
    WHERE p.id = p_product_id;
    INSERT INTO inventory_movements (product_id, delta, reason, note)
    VALUES (p_product_id, p_delta, p_reason, p_note);
    RETURN QUERY SELECT 'adjusted', v_inventory + p_delta;
END $$;
