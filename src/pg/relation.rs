//! Relations, index scans, tuple slots and SPI connections held by guards
//! that give them back when dropped.
//!
//! On the normal path a guard closes what it opened. While an error unwinds
//! (a PostgreSQL ERROR turned into a Rust panic), guards do nothing: calling
//! back into PostgreSQL then could raise a second error in the middle of the
//! first, and the transaction's abort releases all of it anyway (relation
//! references, buffer pins, locks and SPI connections belong to the
//! (sub)transaction's resource owner and memory contexts).
use pgrx::pg_sys;

/// Whether an error is unwinding through the caller.
fn unwinding() -> bool {
    std::thread::panicking()
}

/// A table or index, opened under a lock that is kept to the end of the
/// transaction (as PostgreSQL keeps the locks a statement takes).
pub struct Rel(pg_sys::Relation);

impl Rel {
    /// Opens a relation the caller has already locked.
    ///
    /// # Safety
    /// The caller holds a lock on `oid` taken in this transaction after the
    /// relation was known to exist (for example `LockRelationOid` followed
    /// by a check that no invalidation removed it), so it cannot be dropped
    /// while open.
    pub unsafe fn open_locked(oid: pg_sys::Oid) -> Rel {
        // SAFETY: the caller holds a lock on an existing relation (above);
        // relation_open raises an ERROR rather than return NULL.
        Rel(unsafe { pg_sys::relation_open(oid, pg_sys::NoLock as i32) })
    }

    /// Opens a relation the caller has locked, if it exists (a lock on an
    /// OID does not make the relation exist).
    pub fn try_open_locked(oid: pg_sys::Oid) -> Option<Rel> {
        // SAFETY: try_relation_open checks the syscache for the OID and
        // returns NULL when there is no such relation; the caller's lock
        // keeps it from being dropped while open.
        let rel = unsafe { pg_sys::try_relation_open(oid, pg_sys::NoLock as i32) };
        (!rel.is_null()).then(|| Rel(rel))
    }

    /// Locks `oid` in `mode` and opens it; PostgreSQL checks that it is an
    /// index.
    pub fn index(oid: pg_sys::Oid, mode: u32) -> Rel {
        // SAFETY: index_open takes the lock before it reads the relcache
        // entry, and raises an ERROR if the OID is not an index.
        Rel(unsafe { pg_sys::index_open(oid, mode as i32) })
    }

    pub fn as_ptr(&self) -> pg_sys::Relation {
        self.0
    }

    /// The relation's tuple descriptor (valid while the relation is open).
    pub fn desc(&self) -> pg_sys::TupleDesc {
        // SAFETY: self.0 is an open relcache entry.
        unsafe { (*self.0).rd_att }
    }

    pub fn natts(&self) -> usize {
        // SAFETY: rd_att of an open relation is a valid descriptor.
        unsafe { (*self.desc()).natts as usize }
    }

    pub fn oid(&self) -> pg_sys::Oid {
        // SAFETY: self.0 is an open relcache entry.
        unsafe { (*self.0).rd_id }
    }

    /// The relation's name, for messages.
    pub fn name(&self) -> String {
        // SAFETY: rd_rel of an open relation is its pg_class row; relname
        // is a NUL-terminated NameData.
        unsafe {
            std::ffi::CStr::from_ptr((*(*self.0).rd_rel).relname.data.as_ptr())
                .to_string_lossy()
                .into_owned()
        }
    }

    /// The OIDs of the table's indexes, from the relcache.
    pub fn index_oids(&self) -> Vec<pg_sys::Oid> {
        // SAFETY: RelationGetIndexList returns a palloc'd copy of the
        // relcache's list of index OIDs (or NIL); we read it, then free it.
        unsafe {
            let list = pg_sys::RelationGetIndexList(self.0);
            let mut oids = Vec::new();
            if !list.is_null() {
                for i in 0..(*list).length as usize {
                    oids.push((*(*list).elements.add(i)).oid_value);
                }
            }
            pg_sys::list_free(list);
            oids
        }
    }

    /// The OID of the table's primary key index, or InvalidOid.
    pub fn primary_key(&self) -> pg_sys::Oid {
        // SAFETY: rd_pkindex is valid once rd_indexvalid is set, which
        // RelationGetIndexList ensures (its copy is freed at once).
        unsafe {
            if !(*self.0).rd_indexvalid {
                pg_sys::list_free(pg_sys::RelationGetIndexList(self.0));
            }
            (*self.0).rd_pkindex
        }
    }

    /// Whether the table has triggers now. (`relhastriggers` stays set
    /// after the last trigger is dropped until a VACUUM; the relcache's
    /// trigger descriptor does not.)
    pub fn has_triggers(&self) -> bool {
        // SAFETY: trigdesc of an open relation is NULL or its triggers.
        unsafe { !(*self.0).trigdesc.is_null() }
    }

    /// The number of CHECK constraints on the table.
    pub fn check_constraints(&self) -> usize {
        // SAFETY: constr of a valid descriptor is NULL or its constraints.
        unsafe {
            let constr = (*self.desc()).constr;
            if constr.is_null() {
                0
            } else {
                (*constr).num_check as usize
            }
        }
    }

    /// The attributes of the relation's descriptor, dropped ones included,
    /// in attribute-number order.
    pub fn attributes(&self) -> Vec<&pg_sys::FormData_pg_attribute> {
        let desc = self.desc();
        // SAFETY: desc is the open relation's descriptor, whose attrs array
        // has natts entries and lives as long as the relation is open.
        unsafe { (0..self.natts()).map(|i| &*attribute(desc, i)).collect() }
    }

    /// Attribute number of key column `k` of an index (0 for an
    /// expression).
    pub fn index_key(&self, k: usize) -> pg_sys::AttrNumber {
        let form = self.index_form();
        assert!(k < form.indnatts as usize, "index key {k} out of range");
        // SAFETY: indkey of a pg_index row has indnatts entries; k is below.
        unsafe { *form.indkey.values.as_ptr().add(k) }
    }

    /// The `pg_index` row of an index.
    pub fn index_form(&self) -> &pg_sys::FormData_pg_index {
        // SAFETY: rd_index is set for every open index relation and lives
        // as long as the relcache entry, which `self` keeps open.
        unsafe { &*(*self.0).rd_index }
    }
}

impl Drop for Rel {
    fn drop(&mut self) {
        if unwinding() {
            return;
        }
        // SAFETY: self.0 was opened by this guard and not closed since; the
        // lock stays held to the end of the transaction.
        unsafe { pg_sys::relation_close(self.0, pg_sys::NoLock as i32) }
    }
}

/// Locks a relation by OID. Pending invalidation messages are processed
/// when the lock is first taken in a transaction, so what the caller reads
/// from the catalogs after this reflects every committed change that the
/// lock mode conflicts with.
pub fn lock(oid: pg_sys::Oid, mode: u32) {
    // SAFETY: locking an OID needs no open relation; a lock on an OID that
    // no longer exists is harmless and released at transaction end.
    unsafe { pg_sys::LockRelationOid(oid, mode as i32) }
}

/// A heap tuple slot for one relation's descriptor.
pub struct Slot(pub *mut pg_sys::TupleTableSlot);

impl Slot {
    pub fn for_table(rel: &Rel) -> Slot {
        // SAFETY: rel is open; table_slot_create allocates in the current
        // memory context and the slot is dropped before rel is closed
        // (guards drop in reverse order of creation).
        Slot(unsafe { pg_sys::table_slot_create(rel.as_ptr(), std::ptr::null_mut()) })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if unwinding() {
            return;
        }
        // SAFETY: the slot was made by this guard and is dropped once; its
        // buffer pin, if any, is released with it.
        unsafe { pg_sys::ExecDropSingleTupleTableSlot(self.0) }
    }
}

/// An index scan, ended when dropped.
pub struct IndexScan(pub pg_sys::IndexScanDesc);

impl Drop for IndexScan {
    fn drop(&mut self) {
        if unwinding() {
            return;
        }
        // SAFETY: the scan was begun by the owner of this guard and is
        // ended once, before its relations are closed.
        unsafe { pg_sys::index_endscan(self.0) }
    }
}

/// A heap scan, ended when dropped.
pub struct HeapScan(pub pg_sys::TableScanDesc);

impl Drop for HeapScan {
    fn drop(&mut self) {
        if unwinding() {
            return;
        }
        // SAFETY: the scan was begun by heap_beginscan for the owner of this
        // guard and is ended once, before its relation is closed.
        unsafe { pg_sys::heap_endscan(self.0) }
    }
}

/// An SPI connection, finished when dropped.
pub struct Spi(());

impl Spi {
    pub fn connect() -> Spi {
        // SAFETY: SPI_connect only fails (with an ERROR) when SPI is in an
        // inconsistent state; the connection is finished by Drop, or by
        // the transaction's abort on an error.
        unsafe { pg_sys::SPI_connect() };
        Spi(())
    }
}

impl Drop for Spi {
    fn drop(&mut self) {
        if unwinding() {
            return;
        }
        // SAFETY: this guard opened the innermost SPI connection, and
        // nothing opened inside it is still connected.
        unsafe { pg_sys::SPI_finish() };
    }
}

/// Runs `f` as `role`, like the body of a SECURITY DEFINER function; the
/// caller's user id and security context come back when `f` returns or
/// unwinds (an aborted (sub)transaction would restore them too).
pub fn as_role<T>(role: pg_sys::Oid, f: impl FnOnce() -> T) -> T {
    struct Restore(pg_sys::Oid, i32);
    impl Drop for Restore {
        fn drop(&mut self) {
            // SAFETY: restores the values read below; plain assignments to
            // globals, which cannot fail, so this is safe while unwinding.
            unsafe { pg_sys::SetUserIdAndSecContext(self.0, self.1) };
        }
    }
    let (mut user, mut context) = (pg_sys::InvalidOid, 0);
    // SAFETY: both functions only read and write backend globals.
    unsafe {
        pg_sys::GetUserIdAndSecContext(&mut user, &mut context);
        pg_sys::SetUserIdAndSecContext(role, context | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32);
    }
    let _restore = Restore(user, context);
    f()
}

/// Refuses to write in a read-only transaction or on a standby (25006), as
/// an INSERT would, before anything is claimed or written.
pub fn check_writable(function: &std::ffi::CStr) {
    // SAFETY: PreventCommandIfReadOnly only reads backend state and raises
    // an ERROR when writes are not allowed.
    unsafe { pg_sys::PreventCommandIfReadOnly(function.as_ptr()) }
}

/// An attribute's name.
pub fn attname(a: &pg_sys::FormData_pg_attribute) -> &std::ffi::CStr {
    // SAFETY: attname is a NUL-terminated NameData inside the attribute.
    unsafe { std::ffi::CStr::from_ptr(a.attname.data.as_ptr()) }
}

/// Attribute `i` (from 0) of a tuple descriptor, `TupleDescAttr` in C.
///
/// # Safety
/// `desc` is a valid descriptor and `i < natts`.
pub unsafe fn attribute(desc: pg_sys::TupleDesc, i: usize) -> *const pg_sys::FormData_pg_attribute {
    // SAFETY: as the caller promises. Up to 17 the attributes are the
    // descriptor's trailing array; from 18 they follow its natts compact
    // attributes (TupleDescAttr is then an inline function that pgrx
    // reaches only through a guarded shim).
    unsafe {
        #[cfg(not(feature = "pg18"))]
        let attrs = (*desc).attrs.as_ptr();
        #[cfg(feature = "pg18")]
        let attrs = (*desc)
            .compact_attrs
            .as_ptr()
            .add((*desc).natts as usize)
            .cast::<pg_sys::FormData_pg_attribute>();
        attrs.add(i)
    }
}

/// `index_beginscan` for `nkeys` scan keys and no ordering.
///
/// # Safety
/// `heap` and `index` are open and locked; `snapshot` outlives the scan.
pub unsafe fn begin_index_scan(
    heap: pg_sys::Relation,
    index: pg_sys::Relation,
    snapshot: pg_sys::Snapshot,
    nkeys: i32,
) -> IndexScan {
    // SAFETY: as the caller promises; PostgreSQL 18 added the
    // instrumentation argument, which may be NULL.
    unsafe {
        #[cfg(not(feature = "pg18"))]
        let scan = pg_sys::index_beginscan(heap, index, snapshot, nkeys, 0);
        #[cfg(feature = "pg18")]
        let scan = pg_sys::index_beginscan(heap, index, snapshot, std::ptr::null_mut(), nkeys, 0);
        IndexScan(scan)
    }
}
