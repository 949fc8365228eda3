//! `idem_upsert` and `idem_insert_once`: retry-safe writes to the caller's
//! own tables, with the caller's privileges.
use crate::observability::stats::{self, Counter};
use crate::pg::errors::{error, Code};
use crate::pg::fmgr::{finfo_v1, Args, Signature};
use crate::pg::relation::{self, Spi};
mod cache;
mod nothing;
mod statements;
mod table;

use cache::Kind;
use table::Target;

pub fn init() {
    cache::init();
}
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::IntoDatum;

struct Call {
    target: std::rc::Rc<Target>,
    /// The statements' parameters: the columns' values in `columns` order,
    /// or the row itself as one jsonb (see `statements::Source`).
    values: Vec<pg_sys::Datum>,
    /// The type of each of `values`.
    types: Vec<pg_sys::Oid>,
    nulls: Vec<std::ffi::c_char>,
    columns: Vec<String>,
    conflict: Vec<String>,
    /// The row's members, by column name (values point into the row).
    entries: Vec<(String, pg_sys::JsonbValue)>,
    /// Which of `target.unique_keys` the conflict columns are.
    key: usize,
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

/// The top-level keys of a jsonb object with their values (pointing into
/// the detoasted row, which lives as long as the call); None when it is
/// not an object.
fn object_entries(row: pg_sys::Datum) -> Option<Vec<(String, pg_sys::JsonbValue)>> {
    // SAFETY: row is a jsonb datum (the declared type of the argument);
    // the iterator walks its detoasted copy, which lives as long as the
    // call's memory context, and so do the values that point into it.
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
                    keys.push((
                        String::from_utf8_lossy(bytes).into_owned(),
                        pg_sys::JsonbValue::default(),
                    ));
                }
                pg_sys::JsonbIteratorToken::WJB_VALUE => {
                    if let Some(last) = keys.last_mut() {
                        last.1 = v;
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
    let row = not_null(args.datum(1), "data");
    let conflict_arg: Option<Vec<Option<String>>> = args
        .datum(2)
        // SAFETY: argument 2 is declared text[] (checked by Args::new).
        .and_then(|d| unsafe { Vec::<Option<String>>::from_datum(d, false) });
    // Lock first, then look: the lock (the one the statements take anyway)
    // processes pending invalidations, so the description read next is the
    // table's shape now, and no ALTER TABLE can change it before the
    // transaction ends.
    relation::lock(relid, pg_sys::RowExclusiveLock);
    let target = cache::target(relid);
    let name = &target.name;
    if target.distributed && what == "idem_upsert" {
        error(
            Code::ERRCODE_FEATURE_NOT_SUPPORTED,
            format!("idem_upsert cannot write to {name}, a Citus distributed table"),
        )
        .detail("Citus cannot ship the statement that compares the stored row with the new one.")
        .hint("Use idem_insert_once, or INSERT ... ON CONFLICT DO UPDATE, on distributed tables.")
        .raise();
    }

    let Some(mut entries) = object_entries(row) else {
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
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    let columns: Vec<String> = entries.iter().map(|(k, _)| k.clone()).collect();
    for c in &columns {
        if target.column(c).is_none() {
            error(
                Code::ERRCODE_UNDEFINED_COLUMN,
                format!("column \"{c}\" of relation {name} does not exist"),
            )
            .hint("The keys of data must be column names of the target, spelled exactly.")
            .raise();
        }
    }

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
    let unique = target.unique_keys.iter().position(|k| {
        let mut cols = k.columns.clone();
        cols.sort();
        cols == conflict
    });
    let Some(key) = unique.filter(|_| !conflict.is_empty()) else {
        error(
            Code::ERRCODE_INVALID_COLUMN_REFERENCE,
            format!("{name} has no unique index on exactly ({})", conflict.join(", ")),
        )
        .hint("conflict_columns must be the columns of the primary key or of a unique index without a WHERE clause or expressions.")
        .raise();
    };
    // The conflicting row is found by these values; a missing or NULL one
    // matches nothing, and every retry would insert again.
    for c in &conflict {
        match entries.iter().find(|(k, _)| k == c) {
            None => error(
                Code::ERRCODE_INVALID_PARAMETER_VALUE,
                format!("the row for {what} into {name} has no value for the conflict column \"{c}\""),
            )
            .hint("Give every column of conflict_columns (by default the primary key) a value in data.")
            .raise(),
            Some((_, v)) if v.type_ == pg_sys::jbvType::jbvNull => error(
                Code::ERRCODE_NOT_NULL_VIOLATION,
                format!("the row for {what} into {name} has NULL for the conflict column \"{c}\""),
            )
            .hint("A NULL never conflicts, so retries would insert again; give it a value.")
            .raise(),
            Some(_) => {}
        }
    }
    let types = statements::parameter_types(&target, &columns);
    let (values, nulls) = if target.typed(&columns) {
        entries
            .iter_mut()
            .map(
                |(name, v)| match convert(target.column(name).expect("columns were checked"), v) {
                    Some(d) => (d, b' ' as std::ffi::c_char),
                    None => (pg_sys::Datum::from(0usize), b'n' as std::ffi::c_char),
                },
            )
            .unzip()
    } else {
        (vec![row], vec![b' ' as std::ffi::c_char])
    };
    Call {
        target,
        values,
        types,
        nulls,
        columns,
        conflict,
        entries,
        key,
    }
}

/// One JSON value as a value of `column`, the way `jsonb_populate_record`
/// turns it into a scalar column; None for JSON null.
fn convert(column: &table::Column, v: &mut pg_sys::JsonbValue) -> Option<pg_sys::Datum> {
    use table::Conversion;
    if v.type_ == pg_sys::jbvType::jbvNull {
        return None;
    }
    // SAFETY: v is a scalar or container value of the row's jsonb (see
    // object_entries); the text made from it is NUL-terminated and
    // palloc'd; the input function is the column type's own, with the
    // column's type modifier, so the datum is of the column's type.
    unsafe {
        match column.conversion.as_ref().expect("typed columns convert") {
            Conversion::Jsonb => Some(pg_sys::Datum::from(pg_sys::JsonbValueToJsonb(v))),
            Conversion::Input { function, ioparam } => {
                let text = match v.type_ {
                    pg_sys::jbvType::jbvString => {
                        let s = v.val.string;
                        pg_sys::pnstrdup(s.val, s.len as usize)
                    }
                    pg_sys::jbvType::jbvBool => pg_sys::pstrdup(if v.val.boolean {
                        c"true".as_ptr()
                    } else {
                        c"false".as_ptr()
                    }),
                    pg_sys::jbvType::jbvNumeric => pg_sys::OidOutputFunctionCall(
                        pg_sys::Oid::from(pg_sys::F_NUMERIC_OUT),
                        pg_sys::Datum::from(v.val.numeric),
                    ),
                    _ => {
                        let b = v.val.binary;
                        pg_sys::JsonbToCString(std::ptr::null_mut(), b.data, b.len)
                    }
                };
                let function = &**function as *const pg_sys::FmgrInfo as *mut pg_sys::FmgrInfo;
                Some(pg_sys::InputFunctionCall(
                    function,
                    text,
                    *ioparam,
                    column.typmod,
                ))
            }
        }
    }
}

/// Runs the call's statement of `kind` (SPI connected); returns the number
/// of rows it changed or found (0 when the statement has nothing to do).
fn run(call: &Call, kind: Kind) -> u64 {
    let Some(plan) = call.target.plan(&call.columns, &call.conflict, kind) else {
        return 0;
    };
    // SAFETY: the plan is alive (the call holds its Rc, and freed plans are
    // only freed between calls); its argument types are compared with the
    // values' types before it runs, and values/nulls have one entry each.
    unsafe {
        let n = pg_sys::SPI_getargcount(plan.ptr) as usize;
        let types: Vec<pg_sys::Oid> = (0..n)
            .map(|i| pg_sys::SPI_getargtypeid(plan.ptr, i as i32))
            .collect();
        if types != call.types {
            pgrx::error!(
                "the statement prepared for {} expects other parameter types",
                call.target.name
            );
        }
        let values = call.values.as_ptr() as *mut pg_sys::Datum;
        let rc = pg_sys::SPI_execute_plan(plan.ptr, values, call.nulls.as_ptr(), false, 0);
        if rc < 0 {
            pgrx::error!(
                "the statement for {} failed: SPI code {rc}",
                call.target.name
            );
        }
        pg_sys::SPI_processed
    }
}

/// Answers `f`'s result after running it inside one SPI connection.
fn with_spi<T>(f: impl FnOnce() -> T) -> T {
    let _spi = Spi::connect();
    f()
}

const TARGET_ARGS: &[pg_sys::Oid] = &[pg_sys::REGCLASSOID, pg_sys::JSONBOID, pg_sys::TEXTARRAYOID];

const UPSERT: Signature = Signature {
    name: "idem_upsert",
    args: TARGET_ARGS,
    result: Some(pg_sys::TEXTOID),
};

const INSERT_ONCE: Signature = Signature {
    name: "idem_insert_once",
    args: TARGET_ARGS,
    result: Some(pg_sys::BOOLOID),
};

finfo_v1!(pg_finfo_idem_upsert);

/// `idem_upsert(target, row, conflict_columns) returns text`: `inserted`,
/// `updated`, or `unchanged` when the row already held those values (then
/// nothing is written: no new row version, no lock, no WAL).
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn idem_upsert(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    let _entered = cache::enter();
    // SAFETY: Postgres calls this with the call info of idem_upsert.
    let args = unsafe { Args::new(fcinfo, &UPSERT) };
    let call = prepare_call(&args, "idem_upsert");
    // The common case costs one statement: an update where a value
    // differs. An unchanged row is then found by a read, and only a missing
    // row is inserted. Nothing is written unless something changes, and
    // every answer was true at some moment during the call: "unchanged"
    // when a snapshot showed the row with these values, "inserted" or
    // "updated" when the write happened.
    //
    // A row inserted by another transaction after the first statements'
    // snapshots makes the insert do nothing while no row was seen; in READ
    // COMMITTED the next round sees it. (Higher isolation levels raise
    // 40001 from the insert.)
    let answer = with_spi(|| {
        for _ in 0..3 {
            if run(&call, Kind::Update) > 0 {
                return Some("updated");
            }
            if run(&call, Kind::Same) > 0 {
                return Some("unchanged");
            }
            if run(&call, Kind::Insert) > 0 {
                return Some("inserted");
            }
        }
        None
    });
    if let Some(answer) = answer {
        stats::count(match answer {
            "updated" => Counter::UpsertUpdated,
            "unchanged" => Counter::UpsertUnchanged,
            _ => Counter::UpsertInserted,
        });
        return answer.into_datum().expect("text datum");
    }
    let name = &call.target.name;
    let key = &call.target.unique_keys[call.key];
    let value_of = |column: &table::Column| {
        let (_, v) = call.entries.iter().find(|(k, _)| *k == column.name)?;
        let mut v = *v;
        column.conversion.as_ref()?;
        convert(column, &mut v)
    };
    match nothing::why(&call.target, key, value_of) {
        nothing::Cause::Hidden => error(
            Code::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("could not upsert into {name}: row-level security hides the row that conflicts with this one"),
        )
        .detail(format!(
            "A row with the same ({}) exists, and the policies of {name} keep this role from updating or reading it.",
            key.columns.join(", ")
        ))
        .hint("INSERT ... ON CONFLICT DO UPDATE fails the same way; let the policies show this role the rows it may upsert.")
        .raise(),
        nothing::Cause::Skipped => {
            stats::count(Counter::UpsertSkipped);
            "skipped".into_datum().expect("text datum")
        }
        nothing::Cause::Concurrent => error(
            Code::ERRCODE_T_R_SERIALIZATION_FAILURE,
            format!("could not upsert into {name}: the row kept changing"),
        )
        .hint("Retry the transaction.")
        .raise(),
    }
}

finfo_v1!(pg_finfo_idem_insert_once);

/// `idem_insert_once(target, row, conflict_columns) returns boolean`: true
/// when it inserted; an existing conflicting row is never changed.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn idem_insert_once(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    let _entered = cache::enter();
    // SAFETY: Postgres calls this with the call info of idem_insert_once.
    let args = unsafe { Args::new(fcinfo, &INSERT_ONCE) };
    let call = prepare_call(&args, "idem_insert_once");
    let inserted = with_spi(|| run(&call, Kind::Insert)) == 1;
    stats::count(if inserted {
        Counter::InsertOnceTrue
    } else {
        Counter::InsertOnceFalse
    });
    pg_sys::Datum::from(inserted)
}
