-- Demo data: the seed project's two users and three products, now with prices.
-- Loaded by the local runner (and `migrate --seed`) when the catalog is empty.
INSERT INTO users (email) VALUES
    ('pig@market.com'),
    ('dog@market.com');

INSERT INTO products (sku, name, price_cents, inventory) VALUES
    ('SKU-001', 'Keyboard', 4999, 50),
    ('SKU-002', 'Mouse', 2599, 10),
    ('SKU-003', 'USB-C Cable', 999, 2);
