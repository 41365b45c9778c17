-- V6: who may cancel what. A customer cancels a PENDING order only: once CONFIRMED it has been
-- fulfilled, and putting its stock back months later would sell stock that no longer exists.
-- An admin cancels a CONFIRMED order as a return, and says whether the goods came back.
-- Expand only: cancel_order keeps its V3 signature and result for the previous release.

-- Whether a cancelled order's stock came back: false for a return whose goods did not, NULL
-- otherwise (a cancel or expiry that restocked writes its ledger rows). The books depend on it.
ALTER TABLE orders ADD COLUMN restocked boolean;

-- POST /orders/{id}/cancel as `p_actor` (NULL: an admin). Someone else's order is 'not_found',
-- exactly as a missing one. The order row is locked first, so a processor confirming it at the
-- same moment is either before (and the customer is refused) or after (and finds it CANCELLED).
-- An order is in fulfilment once CONFIRMED, or while PENDING under a live processor claim
-- (its step may be charging or shipping right now): then only an admin cancels it, as a return,
-- and p_restock must say whether the goods came back. Before fulfilment its stock returns (it
-- never left), and p_restock = false is refused. Outcomes: 'released', 'not_found',
-- 'invalid_transition' (with the status), 'restock_required', 'nothing_shipped'.
CREATE FUNCTION cancel_order_as(p_order_id bigint, p_actor bigint, p_restock boolean)
RETURNS TABLE (outcome text, status text, user_id bigint, body text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_status    text;
    v_owner     bigint;
    v_fulfilling boolean;
    v_outcome   text;
    v_new       text;
BEGIN
    SELECT o.status, o.user_id,
           o.status = 'CONFIRMED' OR (o.status = 'PENDING' AND coalesce(o.claimed_until > now(), false))
    INTO v_status, v_owner, v_fulfilling
    FROM orders o WHERE o.id = p_order_id FOR UPDATE;
    IF NOT FOUND OR (p_actor IS NOT NULL AND v_owner <> p_actor) THEN
        RETURN QUERY SELECT 'not_found', NULL::text, NULL::bigint, NULL::text;
        RETURN;
    END IF;
    IF v_fulfilling AND p_actor IS NOT NULL THEN
        RETURN QUERY SELECT 'invalid_transition', v_status, NULL::bigint, NULL::text;
        RETURN;
    END IF;
    IF v_fulfilling AND p_restock IS NULL THEN
        RETURN QUERY SELECT 'restock_required', v_status, NULL::bigint, NULL::text;
        RETURN;
    END IF;
    IF v_status = 'PENDING' AND NOT v_fulfilling AND p_restock = false THEN
        RETURN QUERY SELECT 'nothing_shipped', v_status, NULL::bigint, NULL::text;
        RETURN;
    END IF;
    IF v_fulfilling AND NOT p_restock THEN
        -- A return whose goods did not come back: cancelled, and the stock stays sold (no
        -- ledger row: nothing moved).
        UPDATE orders o SET status = 'CANCELLED', claimed_until = NULL, restocked = false,
                            updated_at = now()
        WHERE o.id = p_order_id;
        v_outcome := 'released';
        v_new := 'CANCELLED';
    ELSE
        -- release_order takes PENDING (claimed or not) and CONFIRMED orders to CANCELLED.
        SELECT r.outcome, r.status INTO v_outcome, v_new
        FROM release_order(p_order_id, 'CANCELLED', 'cancellation') r;
    END IF;
    RETURN QUERY
    SELECT v_outcome, v_new, d.user_id, d.body
    FROM (SELECT 1) one LEFT JOIN order_document(p_order_id) d ON true;
END $$;

-- The previous release's call, with the customer rule. An admin through it (p_actor NULL)
-- keeps V3's behaviour: a CONFIRMED order is cancelled and restocked.
CREATE OR REPLACE FUNCTION cancel_order(p_order_id bigint, p_actor bigint)
RETURNS TABLE (outcome text, status text, user_id bigint, body text)
LANGUAGE sql AS $$
    SELECT c.outcome, c.status, c.user_id, c.body
    FROM cancel_order_as(p_order_id, p_actor, CASE WHEN p_actor IS NULL THEN true END) c
$$;
