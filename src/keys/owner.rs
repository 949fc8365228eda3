//! Who may act on a key. A key belongs to the role that claimed it (the
//! current user of the `idem_begin` that first took it, or took it afresh
//! after it expired). Only that role, or one with its privileges (a member
//! that inherits it, a superuser), may replay it, claim it for a retry,
//! finish, fail or checkpoint it, or see it through `idem_get`. A fencing
//! token is not enough: tokens come from one sequence, so another role could
//! guess one.
use crate::pg::errors::{error, name_key, Code};
use pgrx::pg_sys;

/// The role the caller acts as (`current_user`).
pub fn current_role() -> pg_sys::Oid {
    // SAFETY: reads a backend global.
    unsafe { pg_sys::GetUserId() }
}

/// Whether `role` has the privileges of `owner`.
pub fn has_privileges_of(role: pg_sys::Oid, owner: pg_sys::Oid) -> bool {
    // SAFETY: has_privs_of_role reads the role membership cache; it
    // answers false for a role that no longer exists (a restored dump).
    role == owner || unsafe { pg_sys::has_privs_of_role(role, owner) }
}

/// Whether the caller may act on a key of `owner`. A key without an owner
/// (claimed in transaction mode before 0.2.0) is open to every role.
pub fn may_act_on(owner: Option<pg_sys::Oid>) -> bool {
    may_act_on_as(current_role(), owner)
}

/// Whether `role` may act on a key of `owner`.
pub fn may_act_on_as(role: pg_sys::Oid, owner: Option<pg_sys::Oid>) -> bool {
    owner.is_none_or(|o| has_privileges_of(role, o))
}

/// The owner, when it is a role the caller may not act for.
pub fn denied(owner: Option<pg_sys::Oid>) -> Option<pg_sys::Oid> {
    owner.filter(|_| !may_act_on(owner))
}

/// Raises 42501 unless the caller may act on a key of `owner`.
pub fn check(owner: Option<pg_sys::Oid>, key: &str, scope: &str) {
    if let Some(owner) = denied(owner) {
        refuse(key, scope, owner);
    }
}

fn role_name(oid: pg_sys::Oid) -> String {
    // SAFETY: GetUserNameFromId with noerr returns a palloc'd name or NULL.
    unsafe {
        let p = pg_sys::GetUserNameFromId(oid, true);
        if p.is_null() {
            format!("{}", oid.to_u32())
        } else {
            std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    }
}

/// The error for a caller without the privileges of a key's owner.
pub fn refuse(key: &str, scope: &str, owner: pg_sys::Oid) -> ! {
    error(
        Code::ERRCODE_INSUFFICIENT_PRIVILEGE,
        format!("permission denied for {}", name_key(key, scope)),
    )
    .detail(format!(
        "The key belongs to role \"{}\"; role \"{}\" does not have its privileges.",
        role_name(owner),
        role_name(current_role())
    ))
    .hint("Act on a key as the role that claimed it, or as a member of that role.")
    .raise()
}
