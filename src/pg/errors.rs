//! Every error a caller can branch on carries its own SQLSTATE, names the key
//! (and the scope when it is not empty) and, where an action helps, a hint.
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{PgLogLevel, PgSqlErrorCode};

pub use pgrx::PgSqlErrorCode as Code;

/// The longest piece of a key quoted in a message; longer keys are cut.
const QUOTED_KEY_CHARS: usize = 80;

fn quoted(s: &str) -> String {
    match s.char_indices().nth(QUOTED_KEY_CHARS) {
        Some((cut, _)) => format!("\"{}...\"", &s[..cut]),
        None => format!("\"{s}\""),
    }
}

/// `idempotency key "k"` or `idempotency key "k" in scope "s"`.
pub fn name_key(key: &str, scope: &str) -> String {
    if scope.is_empty() {
        format!("idempotency key {}", quoted(key))
    } else {
        format!("idempotency key {} in scope {}", quoted(key), quoted(scope))
    }
}

/// Errors reach clients without Rust backtraces, whatever the server's
/// environment: pgrx adds the backtrace its panic hook captured to the
/// DETAIL of an error raised inside PostgreSQL code we called, and
/// `Backtrace::capture` captures when `RUST_BACKTRACE` is set, as it may
/// be where the server was started by hand. `RUST_LIB_BACKTRACE=0` turns
/// capturing off (std reads it first, once, on the first capture).
pub fn no_backtraces() {
    // SAFETY: a backend runs on one thread: nothing reads the environment
    // while it is changed.
    unsafe { std::env::set_var("RUST_LIB_BACKTRACE", "0") };
}

pub struct Raise {
    report: ErrorReport,
}

#[track_caller]
pub fn error(code: PgSqlErrorCode, message: impl Into<String>) -> Raise {
    Raise {
        report: ErrorReport::new(code, message.into(), "idempotency"),
    }
}

impl Raise {
    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.report = self.report.set_detail(detail.into());
        self
    }

    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.report = self.report.set_hint(hint.into());
        self
    }

    pub fn raise(self) -> ! {
        self.report.report(PgLogLevel::ERROR);
        unreachable!("ERROR does not return")
    }
}
