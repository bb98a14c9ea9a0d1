-- Fencing tokens on leases: every claim takes a new token from `lease_token`, and a claimant
-- may record, mark, reschedule or renew a row only while the row still carries its token.
ALTER TABLE outbox ADD COLUMN lease_token INTEGER;
INSERT INTO sequences (name, value) VALUES ('lease_token', 0);
