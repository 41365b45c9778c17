-- V9: GET /orders (list-orders) reads a user's orders newest first: one index gives them in
-- order, so a page costs its own rows, however many orders the user has. The V1 index on
-- (user_id) alone is now redundant; it goes in a later release (contract), once no release
-- depends on it.
CREATE INDEX orders_user_id_id_idx ON orders (user_id, id);
