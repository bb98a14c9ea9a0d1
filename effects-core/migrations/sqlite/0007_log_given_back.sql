-- A delivery given back (nack) is no longer leased: a heartbeat for it is refused. Reset when the
-- message is handed out again.
ALTER TABLE log_deliveries ADD COLUMN given_back INTEGER NOT NULL DEFAULT 0;
