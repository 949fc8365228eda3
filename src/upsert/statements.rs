//! The SQL text of the statements run against a target table. Values come
//! in as parameters (see `Source`); everything else is a quoted identifier.
use super::cache::Kind;
use super::table::Target;
use pgrx::pg_sys;
use std::ffi::{CStr, CString};

pub fn quote_ident(name: &str) -> String {
    let c = CString::new(name).expect("identifiers hold no NUL");
    // SAFETY: quote_identifier takes a NUL-terminated string and returns
    // it or a palloc'd quoted copy.
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
        // No equality operator (json): compare the text.
        return format!("{left}::pg_catalog.text OPERATOR(pg_catalog.=) {right}::pg_catalog.text");
    }
    let left_c = CString::new(left).expect("no NUL");
    let right_c = CString::new(right).expect("no NUL");
    // SAFETY: generate_operator_clause appends to a fresh StringInfo; the
    // operator is the type's own equality (from the type cache) and both
    // operands are of that type.
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

/// Where a statement reads the row's values: the `$n` parameters of
/// their own types when every column converts directly (`Target::typed`),
/// else the columns of `jsonb_populate_record(NULL::table, $1) AS s`.
struct Source<'a> {
    columns: &'a [String],
    typed: bool,
}

impl Source<'_> {
    fn value(&self, column: &str) -> String {
        if self.typed {
            let n = self
                .columns
                .iter()
                .position(|c| c == column)
                .expect("a column of the row");
            format!("${}", n + 1)
        } else {
            format!("s.{}", quote_ident(column))
        }
    }

    /// The FROM item that provides `s`, if any.
    fn from(&self, table: &str) -> Option<String> {
        (!self.typed).then(|| format!("pg_catalog.jsonb_populate_record(NULL::{table}, $1) AS s"))
    }
}

/// `t.c = <value>` for every conflict column: the existing row that conflicts.
fn matches(target: &Target, src: &Source, conflict: &[String]) -> String {
    conflict
        .iter()
        .map(|c| equals(target, c, &format!("t.{}", quote_ident(c)), &src.value(c)))
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// True when the row already holds the row's values in every column of
/// `columns`, compared by their stored images (`record_image_eq`, the
/// record image equality `*=` that REFRESH MATERIALIZED VIEW CONCURRENTLY
/// uses; called as a function, since an operator between two ROW()
/// constructors would be applied column by column): `1.0` and
/// `1.00`, or `Ann` and `ann` under a case-insensitive type or collation,
/// are different values to store even when `=` calls them equal. NULL
/// matches NULL. The values are of the columns' own types with their type
/// modifiers applied, exactly what an INSERT or UPDATE would store.
fn same(src: &Source, columns: &[&String]) -> String {
    if columns.is_empty() {
        return "true".to_string();
    }
    let stored = columns
        .iter()
        .map(|c| format!("t.{}", quote_ident(c)))
        .collect::<Vec<_>>()
        .join(", ");
    let given = columns
        .iter()
        .map(|c| src.value(c))
        .collect::<Vec<_>>()
        .join(", ");
    format!("pg_catalog.record_image_eq(ROW({stored}), ROW({given}))")
}

/// The statement of `kind` for `columns` (the row's keys, sorted) with
/// `conflict` as the unique key; None when `kind` has nothing to do (an
/// update of a row whose every column is a conflict column).
///
/// An upsert runs at most three of them, each a single plain statement
/// (see `api::upsert`): `Update` changes the conflicting row only where a
/// value differs, so an unchanged row gets no new version and no lock;
/// `Same` finds the conflicting row holding these values; `Insert` inserts
/// unless a row conflicts.
pub fn build(
    target: &Target,
    columns: &[String],
    conflict: &[String],
    kind: Kind,
) -> Option<String> {
    let table = &target.name;
    let src = Source {
        columns,
        typed: target.typed(columns),
    };
    let updated: Vec<&String> = columns.iter().filter(|c| !conflict.contains(c)).collect();
    let on = matches(target, &src, conflict);
    match kind {
        Kind::Insert => {
            let overriding = if columns
                .iter()
                .any(|c| target.column(c).is_some_and(|c| c.identity_always))
            {
                " OVERRIDING SYSTEM VALUE"
            } else {
                ""
            };
            let values = columns
                .iter()
                .map(|c| src.value(c))
                .collect::<Vec<_>>()
                .join(", ");
            let rows = match src.from(table) {
                Some(from) => format!("SELECT {values} FROM {from}"),
                None => format!("VALUES ({values})"),
            };
            Some(format!(
                "INSERT INTO {table} ({}){overriding} {rows} ON CONFLICT ({}) DO NOTHING",
                list(columns, ""),
                list(conflict, "")
            ))
        }
        Kind::Update => {
            if updated.is_empty() {
                return None;
            }
            let set = updated
                .iter()
                .map(|c| format!("{} = {}", quote_ident(c), src.value(c)))
                .collect::<Vec<_>>()
                .join(", ");
            let from = src
                .from(table)
                .map(|f| format!(" FROM {f}"))
                .unwrap_or_default();
            Some(format!(
                "UPDATE {table} AS t SET {set}{from} WHERE {on} AND NOT ({})",
                same(&src, &updated)
            ))
        }
        Kind::Same => {
            let from = src
                .from(table)
                .map(|f| format!(", {f}"))
                .unwrap_or_default();
            Some(format!(
                "SELECT FROM {table} AS t{from} WHERE {on} AND {}",
                same(&src, &updated)
            ))
        }
    }
}

/// The parameter types of the statements for `columns`.
pub fn parameter_types(target: &Target, columns: &[String]) -> Vec<pg_sys::Oid> {
    if target.typed(columns) {
        columns
            .iter()
            .map(|c| target.column(c).expect("columns were checked").type_oid)
            .collect()
    } else {
        vec![pg_sys::JSONBOID]
    }
}
