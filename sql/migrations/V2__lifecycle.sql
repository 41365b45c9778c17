-- V2: the order lifecycle. Idempotent placement, cancellation and expiry with restock, and
-- the processor's claim lease. Every restock writes its ledger row in the same transaction.

-- A failed fulfilment step returns stock too; it gets its own ledger reason.
ALTER TABLE inventory_movements DROP CONSTRAINT inventory_movements_reason_check;
ALTER TABLE inventory_movements ADD CONSTRAINT inventory_movements_reason_check
    CHECK (reason IN ('initial', 'sale', 'cancellation', 'expiry', 'failure', 'adjustment', 'restock'));

-- The processor claims an order by setting a lease; no row lock is held while its step runs.
-- A processor that dies mid-step leaves a lease that simply runs out.
ALTER TABLE orders
    ADD COLUMN claimed_until timestamptz,
    ADD COLUMN attempts      integer NOT NULL DEFAULT 0,
    ADD COLUMN last_error    text;
CREATE INDEX orders_pending_idx ON orders (id) WHERE status = 'PENDING';

-- One row per (user, key). The response is stored in the same transaction as the order, so a
-- key either has its order and its response, or neither. No foreign key to users: an unknown
-- user's key is removed with the refused order.
CREATE TABLE idempotency_keys (
    user_id        bigint NOT NULL,
    key            text NOT NULL CHECK (length(key) BETWEEN 1 AND 255),
    fingerprint    text NOT NULL,
    order_id       bigint REFERENCES orders (id),
    status_code    integer,
    response_body  text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, key)
);
CREATE INDEX idempotency_keys_created_at_idx ON idempotency_keys (created_at);

-- place_order behind an idempotency key, still one call and one transaction.
-- Concurrent requests with one key serialise on the key's unique index: the INSERT of the
-- second waits until the first commits, then finds the row and replays its response.
-- Only a placed order keeps its key; a refused one (no stock, unknown product) removes it, so
-- a retry after a restock can succeed.
-- Outcomes: those of place_order, plus 'replayed' (stored id and body) and
-- 'idempotency_key_reused' (the key was first used for another request).
CREATE FUNCTION place_order_keyed(p_user_id bigint, p_product_ids bigint[], p_quantities integer[],
                                  p_key text, p_fingerprint text)
RETURNS TABLE (outcome text, order_id bigint, body text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_stored  record;
    v_placed  record;
BEGIN
    INSERT INTO idempotency_keys (user_id, key, fingerprint)
    VALUES (p_user_id, p_key, p_fingerprint)
    ON CONFLICT DO NOTHING;
    IF NOT FOUND THEN
        SELECT k.fingerprint, k.order_id, k.status_code, k.response_body INTO v_stored
        FROM idempotency_keys k WHERE k.user_id = p_user_id AND k.key = p_key;
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
        WHERE k.user_id = p_user_id AND k.key = p_key;
    ELSE
        DELETE FROM idempotency_keys k WHERE k.user_id = p_user_id AND k.key = p_key;
    END IF;
    RETURN QUERY SELECT v_placed.outcome, v_placed.order_id, v_placed.body;
END $$;

-- Moves an order to CANCELLED (from PENDING or CONFIRMED) or FAILED (from PENDING only) and
-- returns its stock, exactly once: the order row is locked first, so of two racing releases
-- (a cancel and an expiry) the second sees the new status and changes nothing. Products are
-- then locked in ascending id order, as place_order does, so the two cannot deadlock.
-- Outcomes: 'released', 'not_found', 'invalid_transition' (with the current status).
CREATE FUNCTION release_order(p_order_id bigint, p_target text, p_reason text)
RETURNS TABLE (outcome text, status text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_status text;
BEGIN
    SELECT o.status INTO v_status FROM orders o WHERE o.id = p_order_id FOR UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'not_found', NULL::text;
        RETURN;
    END IF;
    IF NOT (v_status = 'PENDING' OR (v_status = 'CONFIRMED' AND p_target = 'CANCELLED')) THEN
        RETURN QUERY SELECT 'invalid_transition', v_status;
        RETURN;
    END IF;

    PERFORM 1 FROM products p
    WHERE p.id IN (SELECT i.product_id FROM order_items i WHERE i.order_id = p_order_id)
    ORDER BY p.id FOR NO KEY UPDATE;

    WITH items AS (
        SELECT i.product_id, i.quantity FROM order_items i WHERE i.order_id = p_order_id
    ), restocked AS (
        UPDATE products p SET inventory = p.inventory + i.quantity, updated_at = now()
        FROM items i WHERE p.id = i.product_id
    )
    INSERT INTO inventory_movements (product_id, delta, reason, order_id)
    SELECT i.product_id, i.quantity, p_reason, p_order_id FROM items i;

    UPDATE orders o SET status = p_target, claimed_until = NULL, updated_at = now()
    WHERE o.id = p_order_id;
    RETURN QUERY SELECT 'released', p_target;
END $$;

-- POST /orders/{id}/cancel: release, then the order as GET /orders/{id} shows it.
-- Outcomes as release_order's, with the owner and the document when the order exists.
CREATE FUNCTION cancel_order(p_order_id bigint)
RETURNS TABLE (outcome text, status text, user_id bigint, body text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_release record;
BEGIN
    SELECT * INTO v_release FROM release_order(p_order_id, 'CANCELLED', 'cancellation');
    RETURN QUERY
    SELECT v_release.outcome, v_release.status, d.user_id, d.body
    FROM (SELECT 1) one LEFT JOIN order_document(p_order_id) d ON true;
END $$;

-- Expires the oldest stale PENDING order nobody holds: FAILED, stock returned. One order per
-- call and transaction, so a sweep never holds the locks of many orders at once.
-- Returns its id, or NULL when there is none.
CREATE FUNCTION expire_one_order(p_ttl_secs double precision)
RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v_id bigint;
BEGIN
    SELECT o.id INTO v_id FROM orders o
    WHERE o.status = 'PENDING'
      AND o.created_at < now() - make_interval(secs => p_ttl_secs)
      AND (o.claimed_until IS NULL OR o.claimed_until < now())
    ORDER BY o.id LIMIT 1
    FOR UPDATE SKIP LOCKED;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    PERFORM release_order(v_id, 'FAILED', 'expiry');
    RETURN v_id;
END $$;
