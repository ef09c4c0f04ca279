//! The statements of the PostgreSQL backend, built once per backend for its schema.
//!
//! Every statement reads the time from the database server (`clock_timestamp()`, in ms): the
//! one clock that every instance sharing the store agrees on.

/// The server's clock in milliseconds since the Unix epoch, as a one-row CTE `now(ms)`.
const NOW: &str =
    "now AS (SELECT floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint AS ms)";

/// A fencing token: the next sequence value shifted left 16 bits, a random nonce in the low
/// bits (DESIGN §5: unique even if a failover re-issues sequence values).
fn token(s: &str) -> String {
    format!("((nextval('{s}.idemstore_tokens') << 16) | floor(random() * 65536)::bigint)")
}

/// The statements, qualified with one schema.
#[derive(Debug)]
pub(crate) struct Sql {
    pub claim: String,
    pub complete: String,
    pub fail: String,
    pub extend: String,
    pub checkpoint: String,
    pub get: String,
    pub forget: String,
    pub orphans: String,
    pub sweep: String,
    pub sweep_more: String,
    pub close_stale_owners: String,
    pub register_owner: String,
    pub heartbeat: String,
    pub close_owner: String,
}

/// The columns a record is read from, in the order `row_to_record` expects.
pub(crate) const RECORD_COLUMNS: &str = "r.scope, r.key, r.fingerprint, r.state, r.token, \
     r.owner, r.lease_until_ms, r.attempt, r.checkpoint, r.outcome, r.created_ms, \
     r.updated_ms, r.expires_ms";

impl Sql {
    /// The statements for the quoted schema name `s`.
    pub(crate) fn new(s: &str) -> Sql {
        let records = format!("{s}.idemstore_records");
        let owners = format!("{s}.idemstore_owners");
        // Whether the owner of the in-flight record `r` is gone: closed, or silent for longer
        // than the owner timeout (the parameter `timeout`).
        let owner_gone = |r: &str, now: &str, timeout: &str| {
            format!(
                "EXISTS (SELECT 1 FROM {owners} o WHERE o.id = {r}.owner \
                 AND (o.closed_ms IS NOT NULL OR o.heartbeat_ms < {now} - {timeout}))"
            )
        };
        let token = token(s);

        // The claim, in one statement (DESIGN §5). `verdict` decides from the committed row,
        // locking nothing; only an acquisition reaches the INSERT, whose ON CONFLICT branch
        // re-checks the decision on the locked, latest row version and draws the token there,
        // under the row lock. If that re-check fails (another claim won the race), the
        // statement returns `acquire` without a token and the caller runs it again.
        //
        // $1 scope, $2 key, $3 fingerprint, $4 lease ms, $5 retention ms, $6 owner id,
        // $7 per-scope quota (NULL: none), $8 owner timeout ms.
        let gone_cur = owner_gone("r", "now.ms", "$8::bigint");
        let gone_locked = owner_gone("r", "EXCLUDED.updated_ms", "$8::bigint");
        let claim = format!(
            "WITH {NOW},
             cur AS (
                 SELECT r.fingerprint, r.state, r.lease_until_ms, r.outcome, r.updated_ms,
                        r.attempt, r.expires_ms <= now.ms AS expired,
                        (r.lease_until_ms <= now.ms OR {gone_cur}) AS owner_gone
                 FROM {records} r, now WHERE r.scope = $1 AND r.key = $2
             ),
             verdict AS (
                 SELECT CASE
                     WHEN cur.fingerprint IS NULL THEN
                         CASE WHEN $7::bigint IS NOT NULL
                                   AND (SELECT count(*) FROM {records} q WHERE q.scope = $1) >= $7::bigint
                              THEN 'quota' ELSE 'acquire' END
                     WHEN cur.expired THEN 'acquire'
                     WHEN cur.fingerprint <> $3 THEN 'mismatch'
                     WHEN cur.state = 1 THEN 'replay'
                     WHEN cur.state = 2 OR cur.owner_gone THEN 'acquire'
                     ELSE 'in_progress' END AS v
                 FROM now LEFT JOIN cur ON true
             ),
             ins AS (
                 INSERT INTO {records} AS r (scope, key, fingerprint, state, token, owner,
                     lease_until_ms, attempt, takeover, checkpoint, outcome, created_ms,
                     updated_ms, expires_ms)
                 SELECT $1, $2, $3, 0, {token}, $6, now.ms + $4::bigint, 1, false, NULL, NULL,
                        now.ms, now.ms, now.ms + $5::bigint
                 FROM now, verdict WHERE verdict.v = 'acquire'
                 ON CONFLICT (scope, key) DO UPDATE SET
                     fingerprint = EXCLUDED.fingerprint,
                     state = 0,
                     token = {token},
                     owner = EXCLUDED.owner,
                     lease_until_ms = EXCLUDED.lease_until_ms,
                     attempt = CASE WHEN r.expires_ms <= EXCLUDED.updated_ms THEN 1 ELSE r.attempt + 1 END,
                     takeover = r.expires_ms > EXCLUDED.updated_ms AND r.state = 0,
                     checkpoint = CASE WHEN r.expires_ms <= EXCLUDED.updated_ms THEN NULL ELSE r.checkpoint END,
                     outcome = NULL,
                     created_ms = CASE WHEN r.expires_ms <= EXCLUDED.updated_ms THEN EXCLUDED.created_ms ELSE r.created_ms END,
                     updated_ms = EXCLUDED.updated_ms,
                     expires_ms = CASE WHEN r.expires_ms <= EXCLUDED.updated_ms THEN EXCLUDED.expires_ms
                                       ELSE greatest(r.expires_ms, EXCLUDED.expires_ms) END
                 WHERE r.expires_ms <= EXCLUDED.updated_ms
                    OR (r.fingerprint = EXCLUDED.fingerprint
                        AND (r.state = 2
                             OR (r.state = 0 AND (r.lease_until_ms <= EXCLUDED.updated_ms OR {gone_locked}))))
                 RETURNING r.token, r.lease_until_ms, r.attempt, r.takeover, r.checkpoint
             )
             SELECT verdict.v, ins.token, ins.lease_until_ms, ins.attempt, ins.takeover,
                    ins.checkpoint, cur.outcome, cur.updated_ms, cur.attempt,
                    cur.lease_until_ms, now.ms
             FROM now CROSS JOIN verdict LEFT JOIN cur ON true LEFT JOIN ins ON true"
        );

        // Fenced lease writes: only the in-flight, unexpired record under the lease's token
        // changes; zero rows is a lost lease. $1 scope, $2 key, $3 token.
        let fenced = |set: &str, returning: &str| {
            format!(
                "WITH {NOW}
                 UPDATE {records} r SET {set}, updated_ms = now.ms FROM now
                 WHERE r.scope = $1 AND r.key = $2 AND r.token = $3 AND r.state = 0
                   AND r.expires_ms > now.ms
                 RETURNING {returning}"
            )
        };
        let complete = fenced(
            "state = 1, outcome = $4, checkpoint = NULL, expires_ms = now.ms + $5::bigint",
            "r.token",
        );
        let fail = fenced("state = 2", "r.token");
        let extend = fenced(
            "lease_until_ms = now.ms + $4::bigint, \
             expires_ms = greatest(r.expires_ms, now.ms + $4::bigint)",
            "r.lease_until_ms",
        );
        let checkpoint = fenced("checkpoint = $4", "r.token");

        let get = format!(
            "WITH {NOW} SELECT {RECORD_COLUMNS} FROM {records} r, now
             WHERE r.scope = $1 AND r.key = $2 AND r.expires_ms > now.ms"
        );
        let forget = format!(
            "WITH {NOW} DELETE FROM {records} r USING now WHERE r.scope = $1 AND r.key = $2
             RETURNING r.expires_ms > now.ms"
        );
        // $1 limit, $2 owner timeout ms.
        let gone_orphan = owner_gone("r", "now.ms", "$2::bigint");
        let orphans = format!(
            "WITH {NOW} SELECT {RECORD_COLUMNS} FROM {records} r, now
             WHERE r.state = 0 AND r.expires_ms > now.ms
               AND (r.lease_until_ms <= now.ms OR {gone_orphan})
             ORDER BY r.lease_until_ms LIMIT $1"
        );
        // A bounded batch of due records through the expiry index; rows locked by a running
        // claim are skipped, and a row a claim revived in the meantime fails the re-check of
        // FOR UPDATE. $1 limit.
        let sweep = format!(
            "WITH {NOW},
             due AS (
                 SELECT r.scope, r.key FROM {records} r, now WHERE r.expires_ms <= now.ms
                 ORDER BY r.expires_ms LIMIT $1 FOR UPDATE OF r SKIP LOCKED
             ),
             gone AS (
                 DELETE FROM {records} r USING due WHERE r.scope = due.scope AND r.key = due.key
                 RETURNING 1
             )
             SELECT (SELECT count(*) FROM due), (SELECT count(*) FROM gone)"
        );
        let sweep_more = format!(
            "WITH {NOW} SELECT EXISTS (SELECT 1 FROM {records} r, now WHERE r.expires_ms <= now.ms)"
        );
        // $1 owner timeout ms.
        let close_stale_owners = format!(
            "WITH {NOW} UPDATE {owners} o SET closed_ms = now.ms FROM now
             WHERE o.closed_ms IS NULL AND o.heartbeat_ms < now.ms - $1::bigint"
        );
        // $1 instance name: closes the earlier owners of that name, registers a new one.
        let register_owner = format!(
            "WITH {NOW},
             closed AS (
                 UPDATE {owners} o SET closed_ms = now.ms FROM now
                 WHERE o.name = $1 AND o.closed_ms IS NULL
             )
             INSERT INTO {owners} (name, started_ms, heartbeat_ms)
             SELECT $1, now.ms, now.ms FROM now RETURNING id"
        );
        let heartbeat = format!(
            "WITH {NOW} UPDATE {owners} o SET heartbeat_ms = now.ms FROM now
             WHERE o.id = $1 AND o.closed_ms IS NULL RETURNING o.id"
        );
        let close_owner = format!(
            "WITH {NOW} UPDATE {owners} o SET closed_ms = now.ms FROM now
             WHERE o.id = $1 AND o.closed_ms IS NULL"
        );
        Sql {
            claim,
            complete,
            fail,
            extend,
            checkpoint,
            get,
            forget,
            orphans,
            sweep,
            sweep_more,
            close_stale_owners,
            register_owner,
            heartbeat,
            close_owner,
        }
    }
}
