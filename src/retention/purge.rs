//! `idem_purge`: deletes expired keys, a batch at a time. The background
//! worker (`worker.rs`) runs the same batches.
use crate::observability::stats::{self, Counter};
use crate::pg::errors::{error, Code};
use crate::pg::fmgr::{finfo_v1, Args, Signature};
use crate::pg::relation::check_writable;
use pgrx::pg_sys;
use pgrx::prelude::*;

/// Deletes up to $1 expired keys (NULL: all) of one table and counts them.
/// Rows another transaction has locked (a key being claimed again,
/// finished, or already being purged) are skipped, never waited for; the
/// row lock taken here makes a claim that comes after it wait for this
/// delete (and then find no row). Every name and operator is qualified:
/// the worker runs it with the database's default search_path.
const DELETE_EXPIRED: &str = "WITH gone AS (
    DELETE FROM {table}
     WHERE ctid OPERATOR(pg_catalog.=) ANY (ARRAY(
               SELECT ctid FROM {table}
                WHERE expires_at OPERATOR(pg_catalog.<) pg_catalog.clock_timestamp()
                LIMIT $1
                  FOR UPDATE SKIP LOCKED))
    RETURNING 1)
SELECT pg_catalog.count(*) FROM gone";

/// `idempotency.keys`: its OID and name.
const KEY_TABLE: &str = "SELECT c.oid, 'idempotency.keys' \
       FROM pg_catalog.pg_class c \
       JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace \
      WHERE n.nspname OPERATOR(pg_catalog.=) 'idempotency' \
        AND c.relname OPERATOR(pg_catalog.=) 'keys'";

/// On Citus, the shards of `idempotency.keys` that this node holds (the
/// distributed table itself is then an empty shell, on every node).
const KEY_SHARDS: &str = "SELECT t.oid, t.name FROM ( \
     SELECT pg_catalog.to_regclass(pg_catalog.format('idempotency.%I', 'keys_' OPERATOR(pg_catalog.||) s.shardid)) AS oid, \
            pg_catalog.format('idempotency.%I', 'keys_' OPERATOR(pg_catalog.||) s.shardid) AS name \
       FROM pg_catalog.pg_dist_shard s \
       JOIN pg_catalog.pg_dist_placement p ON p.shardid OPERATOR(pg_catalog.=) s.shardid \
      WHERE s.logicalrelid OPERATOR(pg_catalog.=) pg_catalog.to_regclass('idempotency.keys') \
        AND p.shardstate OPERATOR(pg_catalog.=) 1 \
        AND p.groupid OPERATOR(pg_catalog.=) (SELECT groupid FROM pg_catalog.pg_dist_local_group) \
      ORDER BY s.shardid) t \
  WHERE t.oid IS NOT NULL";

/// The tables whose expired keys a purge on this node deletes: the key
/// table or, once Citus distributes it, this node's shards of it (each
/// node purges its own; the distributed table is a shell).
fn key_tables() -> Vec<(pg_sys::Oid, String)> {
    let read = |sql: &str| {
        Spi::connect(|client| {
            let mut tables = Vec::new();
            for row in client.select(sql, None, &[])? {
                if let (Some(oid), Some(name)) = (row.get::<pg_sys::Oid>(1)?, row.get::<String>(2)?)
                {
                    tables.push((oid, name));
                }
            }
            Ok::<_, pgrx::spi::SpiError>(tables)
        })
        .unwrap_or_else(|e| pgrx::error!("could not find the key tables: {e}"))
    };
    let table = read(KEY_TABLE);
    let distributed = crate::citus::installed()
        && table
            .first()
            .is_some_and(|(oid, _)| crate::citus::distributed(*oid));
    if distributed {
        read(KEY_SHARDS)
    } else {
        table
    }
}

/// Takes the locks the DELETE needs (ROW EXCLUSIVE on every key table of
/// this node, their indexes, TOAST tables and those ones' indexes) if no
/// one holds or awaits a conflicting one; false otherwise (the locks taken
/// are kept to the end of the transaction, which is short). For the
/// worker, which must not queue behind DDL or maintenance (the DELETE
/// itself would wait up to `lock_timeout`).
pub fn lock_without_waiting() -> bool {
    key_tables().into_iter().all(|(table, _)| {
        let Some(relations) = Spi::get_one_with_args::<Vec<pg_sys::Oid>>(
            "SELECT ARRAY[c.oid, c.reltoastrelid] OPERATOR(pg_catalog.||) ARRAY(SELECT i.indexrelid FROM pg_catalog.pg_index i \
                        WHERE i.indrelid OPERATOR(pg_catalog.=) ANY (ARRAY[c.oid, c.reltoastrelid]) \
                        ORDER BY i.indexrelid) \
               FROM pg_catalog.pg_class c WHERE c.oid OPERATOR(pg_catalog.=) $1",
            &[table.into()],
        )
        .ok()
        .flatten() else {
            return false;
        };
        // The table first, as the DELETE locks it, then the rest (0: no
        // TOAST table).
        relations
            .into_iter()
            .filter(|oid| *oid != pg_sys::InvalidOid)
            .all(|oid| {
                // SAFETY: a conditional lock on an OID needs no open
                // relation; it is kept to the end of the transaction.
                unsafe { pg_sys::ConditionalLockRelationOid(oid, pg_sys::RowExclusiveLock as i32) }
            })
    })
}

/// One batch: deletes up to `limit` expired keys (None: all) in the
/// current transaction, from every key table of this node in turn; returns
/// how many. The caller counts them in `idem_stats()`.
pub fn batch(limit: Option<i64>) -> i64 {
    let mut deleted = 0;
    for (_, table) in key_tables() {
        let left = limit.map(|l| l - deleted);
        if left.is_some_and(|l| l <= 0) {
            break;
        }
        let sql = DELETE_EXPIRED.replace("{table}", &table);
        // `update`: a statement that writes, run with a new snapshot (SPI's
        // read-only mode would refuse the DELETE).
        deleted += Spi::connect_mut(|client| {
            client
                .update(&sql, None, &[left.into()])?
                .first()
                .get_one::<i64>()
        })
        .unwrap_or_else(|e| pgrx::error!("could not purge expired keys: {e}"))
        .unwrap_or(0);
    }
    deleted
}

finfo_v1!(pg_finfo_idem_purge);

const SIGNATURE: Signature = Signature {
    name: "idem_purge",
    args: &[pg_sys::INT4OID],
    result: Some(pg_sys::INT8OID),
};

/// `idem_purge(batch_size)`: SECURITY DEFINER in SQL, so it deletes every
/// role's expired keys as the extension's owner.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn idem_purge(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    // SAFETY: Postgres calls this with the call info of idem_purge.
    let args = unsafe { Args::new(fcinfo, &SIGNATURE) };
    let limit = args.i32(0);
    // 25006 in a read-only transaction or on a standby, as the DELETE
    // would say, before SPI asks for a transaction id (which a standby
    // refuses with an internal error).
    check_writable(c"idem_purge");
    if limit.is_some_and(|n| n < 0) {
        error(
            Code::ERRCODE_INVALID_PARAMETER_VALUE,
            "batch_size must not be negative",
        )
        .hint("Pass how many expired keys to delete at most, or NULL for all of them.")
        .raise();
    }
    let n = batch(limit.map(i64::from));
    // Counted when the call returns, as every call is.
    stats::add(Counter::KeysPurged, n as u64);
    pg_sys::Datum::from(n)
}
