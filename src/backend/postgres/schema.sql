-- The PostgreSQL backend's schema, version 1.
--
-- The backend creates it itself when it first connects (PostgresBuilder::create_schema, on by
-- default), inside one transaction under an advisory lock, and records the version in
-- idemstore_meta; a database holding a newer version is refused. Every `{schema}` below is
-- replaced by the configured schema name, quoted (default "public"). To create it by hand
-- (a role without CREATE rights at run time), replace `{schema}` and run this file, then
-- insert the version row as the last statement does.
--
-- All times are milliseconds since the Unix epoch read from the database server's clock:
-- one clock for every instance sharing the store.

CREATE TABLE IF NOT EXISTS {schema}.idemstore_meta (
    name  text   PRIMARY KEY,
    value bigint NOT NULL
);

CREATE SEQUENCE IF NOT EXISTS {schema}.idemstore_tokens AS bigint;

-- One row per backend instance (a process's PostgresBackend). An instance that connects under
-- the name of an earlier one closes it, so the earlier one's in-flight records can be taken
-- over at once; an owner whose heartbeat is older than the owner timeout counts as closed.
CREATE TABLE IF NOT EXISTS {schema}.idemstore_owners (
    id           bigserial PRIMARY KEY,
    name         text      NOT NULL,
    started_ms   bigint    NOT NULL,
    heartbeat_ms bigint    NOT NULL,
    closed_ms    bigint
);
CREATE INDEX IF NOT EXISTS idemstore_owners_open ON {schema}.idemstore_owners (name)
    WHERE closed_ms IS NULL;

-- One row per (scope, key). state: 0 in flight, 1 completed, 2 failed (retryable).
-- token: the fencing token of the lease that owns (or last owned) the record: a sequence
-- value shifted left 16 bits with a random 16-bit nonce in the low bits, so a token stays
-- unique even if the sequence is re-issued after a failover.
CREATE TABLE IF NOT EXISTS {schema}.idemstore_records (
    scope          bytea    NOT NULL,
    key            bytea    NOT NULL,
    fingerprint    bytea    NOT NULL,
    state          smallint NOT NULL,
    token          bigint   NOT NULL,
    owner          bigint   NOT NULL,
    lease_until_ms bigint   NOT NULL,
    attempt        integer  NOT NULL,
    takeover       boolean  NOT NULL,
    checkpoint     bytea,
    outcome        bytea,
    created_ms     bigint   NOT NULL,
    updated_ms     bigint   NOT NULL,
    expires_ms     bigint   NOT NULL,
    PRIMARY KEY (scope, key)
);

-- The sweep walks this index: a bounded batch of the oldest expiries, O(batch).
CREATE INDEX IF NOT EXISTS idemstore_records_expiry ON {schema}.idemstore_records (expires_ms);

-- Orphans: in-flight records by lease end.
CREATE INDEX IF NOT EXISTS idemstore_records_in_flight ON {schema}.idemstore_records (lease_until_ms)
    WHERE state = 0;

INSERT INTO {schema}.idemstore_meta (name, value) VALUES ('schema_version', 1);
