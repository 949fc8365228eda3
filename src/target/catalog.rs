//! What a target table looks like, read from the catalogs once per backend
//! (and again after the table changes).
use crate::errors::{error, Code};
use pgrx::pg_sys;
use pgrx::prelude::*;
use serde_json::Value;

pub struct Column {
    pub name: String,
    pub type_oid: pg_sys::Oid,
    /// `GENERATED ALWAYS AS IDENTITY`: a given value needs OVERRIDING SYSTEM VALUE.
    pub identity_always: bool,
    /// The type's default equality operator, or InvalidOid (values then
    /// compare as text).
    pub equality: pg_sys::Oid,
}

pub struct UniqueKey {
    pub primary: bool,
    pub columns: Vec<String>,
}

pub struct Target {
    pub relid: pg_sys::Oid,
    /// The schema-qualified, quoted name.
    pub name: String,
    pub columns: Vec<Column>,
    pub unique_keys: Vec<UniqueKey>,
}

impl Target {
    pub fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }

    pub fn primary_key(&self) -> Option<&UniqueKey> {
        self.unique_keys.iter().find(|k| k.primary)
    }
}

// Every operator and function is qualified: the cache outlives the role and
// search_path of the call that filled it.
const DESCRIBE: &str = "SELECT pg_catalog.jsonb_build_object(
    'relkind', c.relkind,
    'name', pg_catalog.quote_ident(n.nspname) OPERATOR(pg_catalog.||) '.' OPERATOR(pg_catalog.||) pg_catalog.quote_ident(c.relname),
    'columns', (SELECT pg_catalog.jsonb_agg(pg_catalog.jsonb_build_object(
                    'name', a.attname, 'type', a.atttypid::pg_catalog.int8,
                    'identity', a.attidentity) ORDER BY a.attnum)
                  FROM pg_catalog.pg_attribute a
                 WHERE a.attrelid OPERATOR(pg_catalog.=) c.oid AND a.attnum OPERATOR(pg_catalog.>) 0
                   AND NOT a.attisdropped),
    'unique', (SELECT pg_catalog.jsonb_agg(pg_catalog.jsonb_build_object(
                    'primary', i.indisprimary,
                    'columns', (SELECT pg_catalog.jsonb_agg(a.attname ORDER BY k.ord)
                                  FROM pg_catalog.unnest(i.indkey::pg_catalog.int2[]) WITH ORDINALITY AS k(attnum, ord)
                                  JOIN pg_catalog.pg_attribute a
                                    ON a.attrelid OPERATOR(pg_catalog.=) i.indrelid
                                   AND a.attnum OPERATOR(pg_catalog.=) k.attnum)))
                 FROM pg_catalog.pg_index i
                WHERE i.indrelid OPERATOR(pg_catalog.=) c.oid AND i.indisunique AND i.indisvalid
                  AND i.indpred IS NULL AND i.indexprs IS NULL))
  FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
 WHERE c.oid OPERATOR(pg_catalog.=) $1";

pub fn load(relid: pg_sys::Oid) -> Target {
    let described: Option<pgrx::JsonB> = Spi::connect(|client| {
        let args = unsafe { [pgrx::datum::DatumWithOid::new(relid, pg_sys::OIDOID)] };
        client
            .select(DESCRIBE, Some(1), &args)
            .ok()
            .and_then(|t| t.first().get_one::<pgrx::JsonB>().ok().flatten())
    });
    let Some(pgrx::JsonB(d)) = described else {
        error(
            Code::ERRCODE_UNDEFINED_TABLE,
            format!("relation with OID {} does not exist", relid.to_u32()),
        )
        .raise();
    };
    let name = d["name"].as_str().unwrap_or_default().to_string();
    let relkind = d["relkind"].as_str().unwrap_or_default();
    if relkind != "r" && relkind != "p" {
        error(
            Code::ERRCODE_WRONG_OBJECT_TYPE,
            format!("\"{name}\" is not a table"),
        )
        .detail("idem_upsert and idem_insert_once write to tables and partitioned tables only.")
        .hint("Pass the table behind the view or foreign table.")
        .raise();
    }
    let columns = d["columns"]
        .as_array()
        .map(|cols| {
            cols.iter()
                .map(|c| {
                    let type_oid = pg_sys::Oid::from(c["type"].as_u64().unwrap_or(0) as u32);
                    Column {
                        name: c["name"].as_str().unwrap_or_default().to_string(),
                        type_oid,
                        identity_always: c["identity"].as_str() == Some("a"),
                        equality: equality(type_oid),
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    let unique_keys = match &d["unique"] {
        Value::Array(keys) => keys
            .iter()
            .map(|k| UniqueKey {
                primary: k["primary"].as_bool().unwrap_or(false),
                columns: k["columns"]
                    .as_array()
                    .map(|cs| {
                        cs.iter()
                            .filter_map(|c| c.as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default(),
            })
            .collect(),
        _ => Vec::new(),
    };
    Target {
        relid,
        name,
        columns,
        unique_keys,
    }
}

fn equality(typid: pg_sys::Oid) -> pg_sys::Oid {
    unsafe {
        let entry = pg_sys::lookup_type_cache(typid, pg_sys::TYPECACHE_EQ_OPR as i32);
        if entry.is_null() {
            pg_sys::InvalidOid
        } else {
            (*entry).eq_opr
        }
    }
}
