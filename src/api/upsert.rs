//! `idem_upsert` and `idem_insert_once`: retry-safe writes to the caller's
//! own tables, with the caller's privileges.
use crate::errors::{error, Code};
use crate::fmgr::{finfo_v1, Args};
use crate::target::{self, Kind, Target};
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::IntoDatum;

struct Call {
    target: std::rc::Rc<Target>,
    row: pg_sys::Datum,
    columns: Vec<String>,
    conflict: Vec<String>,
}

fn not_null<T>(v: Option<T>, what: &str) -> T {
    v.unwrap_or_else(|| {
        error(
            Code::ERRCODE_NULL_VALUE_NOT_ALLOWED,
            format!("{what} must not be NULL"),
        )
        .raise()
    })
}

/// The top-level keys of a jsonb object, with whether each value is JSON
/// null; None when it is not an object.
fn object_keys(row: pg_sys::Datum) -> Option<Vec<(String, bool)>> {
    unsafe {
        let jb = pg_sys::pg_detoast_datum(row.cast_mut_ptr()) as *mut pg_sys::Jsonb;
        let mut it = pg_sys::JsonbIteratorInit(&mut (*jb).root);
        let mut v = pg_sys::JsonbValue::default();
        if pg_sys::JsonbIteratorNext(&mut it, &mut v, true)
            != pg_sys::JsonbIteratorToken::WJB_BEGIN_OBJECT
        {
            return None;
        }
        let mut keys = Vec::new();
        loop {
            match pg_sys::JsonbIteratorNext(&mut it, &mut v, true) {
                pg_sys::JsonbIteratorToken::WJB_KEY => {
                    let s = v.val.string;
                    let bytes = std::slice::from_raw_parts(s.val as *const u8, s.len as usize);
                    keys.push((String::from_utf8_lossy(bytes).into_owned(), false));
                }
                pg_sys::JsonbIteratorToken::WJB_VALUE => {
                    if let Some(last) = keys.last_mut() {
                        last.1 = v.type_ == pg_sys::jbvType::jbvNull;
                    }
                }
                pg_sys::JsonbIteratorToken::WJB_DONE => break,
                _ => {}
            }
        }
        Some(keys)
    }
}

fn prepare_call(args: &Args, what: &str) -> Call {
    let relid = pg_sys::Oid::from(not_null(args.datum(0), "target").value() as u32);
    let row = not_null(args.datum(1), "row");
    let conflict_arg: Option<Vec<Option<String>>> = args
        .datum(2)
        .and_then(|d| unsafe { Vec::<Option<String>>::from_datum(d, false) });
    let target = target::target(relid);
    let name = &target.name;

    let Some(entries) = object_keys(row) else {
        error(
            Code::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("the row for {what} into {name} is not a JSON object"),
        )
        .hint("Pass an object of column => value, such as '{\"id\": 1, \"name\": \"a\"}'.")
        .raise();
    };
    if entries.is_empty() {
        error(
            Code::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("the row for {what} into {name} has no columns"),
        )
        .hint("Pass an object of column => value, such as '{\"id\": 1, \"name\": \"a\"}'.")
        .raise();
    }
    let mut columns: Vec<String> = entries.iter().map(|(k, _)| k.clone()).collect();
    for c in &columns {
        if target.column(c).is_none() {
            error(
                Code::ERRCODE_UNDEFINED_COLUMN,
                format!("column \"{c}\" of relation {name} does not exist"),
            )
            .hint("The keys of row must be column names of the target, spelled exactly.")
            .raise();
        }
    }
    columns.sort();

    let mut conflict: Vec<String> = match conflict_arg {
        None => match target.primary_key() {
            Some(pk) => pk.columns.clone(),
            None => error(
                Code::ERRCODE_INVALID_COLUMN_REFERENCE,
                format!("{name} has no primary key"),
            )
            .hint("Pass conflict_columns naming the columns of a unique index.")
            .raise(),
        },
        Some(list) => list
            .into_iter()
            .map(|c| not_null(c, "an element of conflict_columns"))
            .collect(),
    };
    conflict.sort();
    conflict.dedup();
    for c in &conflict {
        if target.column(c).is_none() {
            error(
                Code::ERRCODE_UNDEFINED_COLUMN,
                format!("column \"{c}\" of relation {name} does not exist"),
            )
            .hint("conflict_columns must name columns of the target.")
            .raise();
        }
    }
    let unique = target.unique_keys.iter().any(|k| {
        let mut cols = k.columns.clone();
        cols.sort();
        cols == conflict
    });
    if conflict.is_empty() || !unique {
        error(
            Code::ERRCODE_INVALID_COLUMN_REFERENCE,
            format!("{name} has no unique index on exactly ({})", conflict.join(", ")),
        )
        .hint("conflict_columns must be the columns of the primary key or of a unique index without a WHERE clause or expressions.")
        .raise();
    }
    // The conflicting row is found by these values; a missing or NULL one
    // matches nothing, and every retry would insert again.
    for c in &conflict {
        match entries.iter().find(|(k, _)| k == c) {
            None => error(
                Code::ERRCODE_INVALID_PARAMETER_VALUE,
                format!("the row for {what} into {name} has no value for the conflict column \"{c}\""),
            )
            .hint("Give every column of conflict_columns (by default the primary key) a value in row.")
            .raise(),
            Some((_, true)) => error(
                Code::ERRCODE_NOT_NULL_VIOLATION,
                format!("the row for {what} into {name} has NULL for the conflict column \"{c}\""),
            )
            .hint("A NULL never conflicts, so retries would insert again; give it a value.")
            .raise(),
            Some(_) => {}
        }
    }
    Call {
        target,
        row,
        columns,
        conflict,
    }
}

/// Runs the call's statement; returns the first row's int4 columns (or the
/// number of rows changed when the statement returns none).
fn run(call: &Call, kind: Kind) -> Vec<i32> {
    unsafe {
        pg_sys::SPI_connect();
        let plan = target::plan(&call.target, &call.columns, &call.conflict, kind);
        let mut values = [call.row];
        let nulls = [b' ' as std::ffi::c_char];
        let rc = pg_sys::SPI_execute_plan(plan, values.as_mut_ptr(), nulls.as_ptr(), false, 0);
        if rc < 0 {
            pgrx::error!(
                "the statement for {} failed: SPI code {rc}",
                call.target.name
            );
        }
        let table = pg_sys::SPI_tuptable;
        let out = if kind == Kind::Upsert && !table.is_null() && pg_sys::SPI_processed == 1 {
            let tuple = *(*table).vals;
            (1..=3)
                .map(|i| {
                    let mut isnull = false;
                    let d = pg_sys::SPI_getbinval(tuple, (*table).tupdesc, i, &mut isnull);
                    d.value() as i32
                })
                .collect()
        } else {
            vec![pg_sys::SPI_processed as i32]
        };
        pg_sys::SPI_finish();
        out
    }
}

finfo_v1!(pg_finfo_idem_upsert);

/// `idem_upsert(target, row, conflict_columns) returns text`: `inserted`,
/// `updated`, or `unchanged` when the row already held those values (then
/// nothing is written: no new row version, no lock, no WAL).
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn idem_upsert(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    let _entered = target::enter();
    let args = unsafe { Args::new(fcinfo) };
    let call = prepare_call(&args, "idem_upsert");
    // A row inserted by another transaction after this statement's snapshot
    // makes both branches do nothing while no row was seen; in READ
    // COMMITTED the next try sees it. (Higher isolation levels raise 40001.)
    for _ in 0..3 {
        let counts = run(&call, Kind::Upsert);
        let answer = match counts.as_slice() {
            [u, _, _] if *u > 0 => "updated",
            [_, i, _] if *i > 0 => "inserted",
            [_, _, e] if *e > 0 => "unchanged",
            _ => continue,
        };
        return answer.into_datum().expect("text datum");
    }
    error(
        Code::ERRCODE_T_R_SERIALIZATION_FAILURE,
        format!(
            "could not upsert into {}: the row kept changing",
            call.target.name
        ),
    )
    .hint("Retry the transaction.")
    .raise()
}

finfo_v1!(pg_finfo_idem_insert_once);

/// `idem_insert_once(target, row, conflict_columns) returns boolean`: true
/// when it inserted; an existing conflicting row is never changed.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn idem_insert_once(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    let _entered = target::enter();
    let args = unsafe { Args::new(fcinfo) };
    let call = prepare_call(&args, "idem_insert_once");
    let inserted = run(&call, Kind::InsertOnce)[0] == 1;
    pg_sys::Datum::from(inserted)
}
