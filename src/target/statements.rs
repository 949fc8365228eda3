//! The SQL text of the statements run against a target table. `$1` is the
//! row as jsonb; everything else is a quoted identifier.
use super::{Kind, Target};
use pgrx::pg_sys;
use std::ffi::{CStr, CString};

pub fn quote_ident(name: &str) -> String {
    let c = CString::new(name).expect("identifiers hold no NUL");
    unsafe {
        CStr::from_ptr(pg_sys::quote_identifier(c.as_ptr()))
            .to_string_lossy()
            .into_owned()
    }
}

fn list(cols: &[String], prefix: &str) -> String {
    cols.iter()
        .map(|c| format!("{prefix}{}", quote_ident(c)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `left = right` with the column type's own equality operator, written
/// `OPERATOR(schema.=)` (with casts where needed) by Postgres' own
/// `generate_operator_clause`, as its foreign-key checks do: the caller's
/// search_path cannot put another `=` in its place.
fn equals(target: &Target, column: &str, left: &str, right: &str) -> String {
    let col = target.column(column).expect("columns were checked");
    if col.equality == pg_sys::InvalidOid {
        return format!("{left}::pg_catalog.text OPERATOR(pg_catalog.=) {right}::pg_catalog.text");
    }
    let left_c = CString::new(left).expect("no NUL");
    let right_c = CString::new(right).expect("no NUL");
    unsafe {
        let buf = pg_sys::makeStringInfo();
        pg_sys::generate_operator_clause(
            buf,
            left_c.as_ptr(),
            col.type_oid,
            col.equality,
            right_c.as_ptr(),
            col.type_oid,
        );
        CStr::from_ptr((*buf).data).to_string_lossy().into_owned()
    }
}

fn matches(target: &Target, conflict: &[String]) -> String {
    conflict
        .iter()
        .map(|c| {
            let q = quote_ident(c);
            equals(target, c, &format!("t.{q}"), &format!("s.{q}"))
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
    let overriding = if columns
        .iter()
        .any(|c| target.column(c).is_some_and(|c| c.identity_always))
    {
        " OVERRIDING SYSTEM VALUE"
    } else {
        ""
    };
    let cols = list(columns, "");
    let src = format!(
        "SELECT {} FROM pg_catalog.jsonb_populate_record(NULL::{table}, $1) AS r",
        list(columns, "r.")
    );
    let insert = format!(
        "INSERT INTO {table} ({cols}){overriding} SELECT {} FROM src s",
        list(columns, "s.")
    );
    match kind {
        Kind::InsertOnce => {
            format!(
                "WITH src AS ({src}) {insert} ON CONFLICT ({}) DO NOTHING",
                list(conflict, "")
            )
        }
        Kind::Upsert => {
            let on = matches(target, conflict);
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
                // IS DISTINCT FROM, spelled with the qualified operator.
                let differs = updated
                    .iter()
                    .map(|c| {
                        let q = quote_ident(c);
                        let (t, s) = (format!("t.{q}"), format!("s.{q}"));
                        format!(
                            "NOT (({t} IS NULL AND {s} IS NULL) OR COALESCE({}, false))",
                            equals(target, c, &t, &s)
                        )
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
                 SELECT u, i, CASE WHEN u OPERATOR(pg_catalog.=) 0 AND i OPERATOR(pg_catalog.=) 0 \
                                   THEN (SELECT pg_catalog.count(*) FROM {table} t, src s WHERE {on})::pg_catalog.int4 \
                                   ELSE 0 END \
                   FROM (SELECT (SELECT pg_catalog.count(*) FROM upd)::pg_catalog.int4 AS u, \
                                (SELECT pg_catalog.count(*) FROM ins)::pg_catalog.int4 AS i) AS c",
                list(conflict, "")
            )
        }
    }
}
