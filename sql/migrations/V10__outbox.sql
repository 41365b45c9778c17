-- V10: a transactional outbox. Every change an order's subscribers care about (placed,
-- confirmed, cancelled, expired, failed) writes a row in the transaction that makes it, from a
-- trigger on orders, so no code path (this release's, the last one's, a psql session's) can
-- change an order without its event. After commit the function that made the change publishes
-- the row as a CloudEvent and deletes it; a row left behind (a crash, a broker that was down)
-- is published by the processor's sweep. Expand only: a new table, a new function, a trigger.
CREATE TABLE outbox (
    order_id    bigint NOT NULL,
    event_type  text NOT NULL CHECK (event_type IN (
                    'dev.tally.order.placed', 'dev.tally.order.confirmed',
                    'dev.tally.order.cancelled', 'dev.tally.order.expired',
                    'dev.tally.order.failed')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    -- One event of each type per order at most, so (order_id, event_type) is the event's id.
    PRIMARY KEY (order_id, event_type)
);

-- A FAILED order is 'expired' when its stock went back for expiry (release_order writes that
-- ledger row before it changes the status), 'failed' when the fulfilment step failed it.
-- SECURITY DEFINER: the row is written as the outbox's owner, so the trigger works for every
-- role that may change an order from the moment this migration commits, before the migrator's
-- grants run (and for a role the grants never name), with nothing granted on outbox for it.
CREATE FUNCTION outbox_order_event() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO outbox (order_id, event_type) VALUES (NEW.id, 'dev.tally.order.placed');
    ELSIF NEW.status IS DISTINCT FROM OLD.status AND NEW.status <> 'PENDING' THEN
        INSERT INTO outbox (order_id, event_type)
        VALUES (NEW.id, CASE NEW.status
            WHEN 'CONFIRMED' THEN 'dev.tally.order.confirmed'
            WHEN 'CANCELLED' THEN 'dev.tally.order.cancelled'
            ELSE CASE WHEN EXISTS (SELECT 1 FROM inventory_movements m
                                   WHERE m.order_id = NEW.id AND m.reason = 'expiry')
                      THEN 'dev.tally.order.expired' ELSE 'dev.tally.order.failed' END
        END)
        ON CONFLICT DO NOTHING;
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER orders_outbox AFTER INSERT OR UPDATE OF status ON orders
    FOR EACH ROW EXECUTE FUNCTION outbox_order_event();
REVOKE ALL ON FUNCTION outbox_order_event() FROM PUBLIC;
