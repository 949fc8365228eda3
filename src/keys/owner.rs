//! Who may act on a key. A key belongs to the role that claimed it (the
//! current user of the `idem_begin` that first took it, or took it afresh
//! after it expired). Only that role, or one with its privileges (a member
//! that inherits it, a superuser), may replay it, claim it for a retry,
//! finish, fail or checkpoint it, or see it through `idem_get`. A fencing
//! token is not enough: tokens come from one sequence, so another role could
//! guess one.
//!
//! A key records its owner's name, not its OID: a dump restored into
//! another cluster, where the same roles have other OIDs, keeps every key
//! its role's (as ownership of objects is restored by name).
use crate::pg::errors::{error, name_key, Code};
use pgrx::pg_sys;
use std::cell::RefCell;
use std::ffi::{CStr, CString};

thread_local! {
    /// The last role named, and its name: the caller's, on nearly every
    /// call. Forgotten when any role changes (a rename).
    static NAMED: RefCell<Option<(pg_sys::Oid, String)>> = const { RefCell::new(None) };
}

pub fn init() {
    crate::pg::inval::on_role_change(forget);
}

fn forget() {
    let _ = NAMED.try_with(|n| n.borrow_mut().take());
}

unsafe extern "C-unwind" {
    /// `utils/init/miscinit.c`, declared without pgrx's error guard (which
    /// costs a sigsetjmp a call, on every replay): it returns a backend
    /// global and cannot raise an error.
    #[link_name = "GetUserId"]
    fn get_user_id() -> pg_sys::Oid;
}

/// The role the caller acts as (`current_user`).
pub fn current_role() -> pg_sys::Oid {
    // SAFETY: GetUserId reads a backend global; it neither allocates nor
    // raises an error.
    unsafe { get_user_id() }
}

/// Whether `role` is named `name`.
fn is_named(role: pg_sys::Oid, name: &str) -> bool {
    with_name(role, |known| known == name)
}

/// `f` of a role's name, looked up once until a role changes.
fn with_name<T>(role: pg_sys::Oid, f: impl FnOnce(&str) -> T) -> T {
    NAMED.with(|n| {
        let mut n = n.borrow_mut();
        match &*n {
            Some((oid, known)) if *oid == role => f(known),
            _ => {
                let known = look_up_name(role);
                let answer = f(&known);
                *n = Some((role, known));
                answer
            }
        }
    })
}

/// A role's name; a role that no longer exists is named by its OID.
pub fn role_name(oid: pg_sys::Oid) -> String {
    with_name(oid, str::to_string)
}

/// The caller's role's name, which a key it claims records.
pub fn current_role_name() -> String {
    role_name(current_role())
}

fn look_up_name(oid: pg_sys::Oid) -> String {
    // SAFETY: GetUserNameFromId with noerr returns a palloc'd copy of the
    // name, or NULL when there is no such role.
    unsafe {
        let p = pg_sys::GetUserNameFromId(oid, true);
        if p.is_null() {
            format!("unknown (OID={})", oid.to_u32())
        } else {
            CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    }
}

/// Whether `role` has the privileges of the role `owner`.
pub fn has_privileges_of(role: pg_sys::Oid, owner: pg_sys::Oid) -> bool {
    // SAFETY: has_privs_of_role reads the role membership cache.
    role == owner || unsafe { pg_sys::has_privs_of_role(role, owner) }
}

/// Whether `role` may act on a key whose owner is named `owner`. A key
/// without an owner (claimed in transaction mode before 0.2.0) is open to
/// every role; one whose role is gone, to superusers alone.
pub fn may_act_on_as(role: pg_sys::Oid, owner: Option<&str>) -> bool {
    let Some(owner) = owner else {
        return true;
    };
    if is_named(role, owner) {
        return true;
    }
    let Ok(name) = CString::new(owner) else {
        return false;
    };
    // SAFETY: get_role_oid with missing_ok looks the name up in the
    // catalog cache and returns InvalidOid for no such role; superuser_arg
    // reads the same cache.
    unsafe {
        match pg_sys::get_role_oid(name.as_ptr(), true) {
            oid if oid == pg_sys::InvalidOid => pg_sys::superuser_arg(role),
            oid => has_privileges_of(role, oid),
        }
    }
}

/// The key's owner, when it is a role the caller may not act for.
pub fn denied(owner: Option<&str>) -> Option<&str> {
    owner.filter(|_| !may_act_on_as(current_role(), owner))
}

/// Raises 42501 unless the caller has the privileges of the role that
/// claimed a key this transaction holds (it may have run SET ROLE since).
pub fn check_holder(claimed_by: pg_sys::Oid, key: &str, scope: &str) {
    if !has_privileges_of(current_role(), claimed_by) {
        refuse(key, scope, &role_name(claimed_by));
    }
}

/// The error for a caller without the privileges of a key's owner.
pub fn refuse(key: &str, scope: &str, owner: &str) -> ! {
    error(
        Code::ERRCODE_INSUFFICIENT_PRIVILEGE,
        format!("permission denied for {}", name_key(key, scope)),
    )
    .detail(format!(
        "The key belongs to role \"{owner}\"; role \"{}\" does not have its privileges.",
        current_role_name()
    ))
    .hint("Act on a key as the role that claimed it, or as a member of that role.")
    .raise()
}
