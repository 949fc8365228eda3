//! The SQL text of the statements run against a target table. `$1` is the
//! row as jsonb; everything else is a quoted identifier.
use super::{Kind, Target};
use pgrx::pg_sys;
use std::ffi::{CStr, CString};

pub fn quote_ident(name: &str) -> String {
    let c = CString::new(name).expect("identifiers hold no NUL");
    unsafe { CStr::from_ptr(pg_sys::quote_identifier(c.as_ptr())).to_string_lossy().into_owned() }
}

fn list(cols: &[String], prefix: &str) -> String {
    cols.iter().map(|c| format!("{prefix}{}", quote_ident(c))).collect::<Vec<_>>().join(", ")
}

fn matches(conflict: &[String]) -> String {
    conflict
        .iter()
        .map(|c| {
            let q = quote_ident(c);
            format!("t.{q} = s.{q}")
        })
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// The statement for `columns` (the row's keys, sorted) with `conflict` as
/// the unique key.
///
/// Upsert, in one statement with one snapshot: `upd` changes the existing
/// row only where a value differs, `ins` inserts when no row conflicts, and
/// the outer SELECT reports which happened and whether a row existed.
/// An unchanged row is neither updated nor locked: no new version, no WAL.
/// The returned columns are (updated, inserted, existed) counts.
pub fn build(target: &Target, columns: &[String], conflict: &[String], kind: Kind) -> String {
    let table = &target.name;
    let overriding = if columns.iter().any(|c| target.column(c).is_some_and(|c| c.identity_always)) {
        " OVERRIDING SYSTEM VALUE"
    } else {
        ""
    };
    let cols = list(columns, "");
    let src = format!("SELECT {} FROM pg_catalog.jsonb_populate_record(NULL::{table}, $1) AS r", list(columns, "r."));
    let insert = format!("INSERT INTO {table} ({cols}){overriding} SELECT {} FROM src s", list(columns, "s."));
    match kind {
        Kind::InsertOnce => {
            format!("WITH src AS ({src}) {insert} ON CONFLICT ({}) DO NOTHING", list(conflict, ""))
        }
        Kind::Upsert => {
            let on = matches(conflict);
            let updated: Vec<&String> = columns.iter().filter(|c| !conflict.contains(c)).collect();
            let upd = if updated.is_empty() {
                "SELECT 1 WHERE false".to_string()
            } else {
                let set = updated
                    .iter()
                    .map(|c| {
                        let q = quote_ident(c);
                        format!("{q} = s.{q}")
                    })
                    .collect::<Vec<_>>()
                    .join(", ");
                let differs = updated
                    .iter()
                    .map(|c| {
                        let q = quote_ident(c);
                        if target.column(c).is_some_and(|c| c.has_equality) {
                            format!("t.{q} IS DISTINCT FROM s.{q}")
                        } else {
                            format!("t.{q}::text IS DISTINCT FROM s.{q}::text")
                        }
                    })
                    .collect::<Vec<_>>()
                    .join(" OR ");
                format!("UPDATE {table} AS t SET {set} FROM src s WHERE {on} AND ({differs}) RETURNING 1")
            };
            // `ins` needs no NOT EXISTS: ON CONFLICT DO NOTHING checks the
            // unique index before inserting and writes nothing on a match
            // (the row `upd` just updated included). Whether a row existed
            // is asked only when neither changed anything (an unused
            // initplan is never run).
            format!(
                "WITH src AS ({src}), \
                 upd AS ({upd}), \
                 ins AS ({insert} ON CONFLICT ({}) DO NOTHING RETURNING 1) \
                 SELECT u, i, CASE WHEN u = 0 AND i = 0 \
                                   THEN (SELECT count(*) FROM {table} t, src s WHERE {on})::int4 \
                                   ELSE 0 END \
                   FROM (SELECT (SELECT count(*) FROM upd)::int4 AS u, (SELECT count(*) FROM ins)::int4 AS i) AS c",
                list(conflict, "")
            )
        }
    }
}
