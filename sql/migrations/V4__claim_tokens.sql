-- V4: a processor acts on an order only while its claim is still its own. The claim token is
-- the order's `attempts` at claim time: if the lease ran out and another processor claimed the
-- order again (attempts + 1), the first one's outcome is dropped instead of applied twice.

-- Fails a claimed order (its step said no) and returns the stock, if the claim still holds.
-- Outcomes: those of release_order, or 'claim_lost'.
CREATE FUNCTION fail_claimed_order(p_order_id bigint, p_attempts integer)
RETURNS TABLE (outcome text, status text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    PERFORM 1 FROM orders o
    WHERE o.id = p_order_id AND o.attempts = p_attempts AND o.status = 'PENDING'
    FOR UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'claim_lost', NULL::text;
        RETURN;
    END IF;
    RETURN QUERY SELECT * FROM release_order(p_order_id, 'FAILED', 'failure');
END $$;
