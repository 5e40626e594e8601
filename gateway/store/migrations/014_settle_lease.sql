-- Leases on pending cost look-ups: the instance that holds a record's look-up renews
-- `lease_until`; another instance claims it only once the lease has run out (its holder
-- died), so after a restart each pending look-up is resumed by one instance only.
ALTER TABLE usage_records ADD COLUMN lease_owner TEXT;
ALTER TABLE usage_records ADD COLUMN lease_until TEXT
