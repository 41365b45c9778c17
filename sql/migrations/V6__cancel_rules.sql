-- V6: who may cancel what. A customer cancels a PENDING order only: once CONFIRMED it has been
-- fulfilled, and putting its stock back months later would sell stock that no longer exists.
-- An admin cancels a CONFIRMED order as a return, and says whether the goods came back.
-- Expand only: cancel_order keeps its V3 signature and result for the previous release.

-- POST /orders/{id}/cancel as `p_actor` (NULL: an admin). Someone else's order is 'not_found',
-- exactly as a missing one. The order row is locked first, so a processor confirming it at the
-- same moment is either before (and the customer is refused) or after (and finds it CANCELLED).
-- p_restock says whether a CONFIRMED order's goods came back; a PENDING order's stock always
-- returns (it never left). Outcomes: 'released', 'not_found', 'invalid_transition' (with the
-- status), 'restock_required' (an admin cancelling a CONFIRMED order without saying).
CREATE FUNCTION cancel_order_as(p_order_id bigint, p_actor bigint, p_restock boolean)
RETURNS TABLE (outcome text, status text, user_id bigint, body text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_status  text;
    v_owner   bigint;
    v_outcome text;
    v_new     text;
BEGIN
    SELECT o.status, o.user_id INTO v_status, v_owner FROM orders o WHERE o.id = p_order_id FOR UPDATE;
    IF NOT FOUND OR (p_actor IS NOT NULL AND v_owner <> p_actor) THEN
        RETURN QUERY SELECT 'not_found', NULL::text, NULL::bigint, NULL::text;
        RETURN;
    END IF;
    IF v_status = 'CONFIRMED' AND p_actor IS NOT NULL THEN
        RETURN QUERY SELECT 'invalid_transition', v_status, NULL::bigint, NULL::text;
        RETURN;
    END IF;
    IF v_status = 'CONFIRMED' AND p_restock IS NULL THEN
        RETURN QUERY SELECT 'restock_required', v_status, NULL::bigint, NULL::text;
        RETURN;
    END IF;
    IF v_status = 'CONFIRMED' AND NOT p_restock THEN
        -- A return whose goods did not come back: cancelled, and the stock stays sold (no
        -- ledger row: nothing moved).
        UPDATE orders o SET status = 'CANCELLED', claimed_until = NULL, updated_at = now()
        WHERE o.id = p_order_id;
        v_outcome := 'released';
        v_new := 'CANCELLED';
    ELSE
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
