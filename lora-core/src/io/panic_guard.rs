//! Readers of file formats we do not own (the parquet crate among them) can panic on a damaged
//! file instead of returning an error. Bad input must never crash a command, so such calls run
//! inside [`contain_panics`], which turns a panic into an error naming the input, and keeps the
//! panic's own message off stderr (the error says it instead).

use std::cell::Cell;
use std::fmt::Display;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Once;

use anyhow::{anyhow, Result};

thread_local! {
    /// Whether this thread is inside `contain_panics`: its panics are reported as errors.
    static CONTAINED: Cell<bool> = const { Cell::new(false) };
}

/// Runs `read`; a panic inside it becomes an error that names `input` and the panic's message.
/// Meant for a dependency's code that reads untrusted bytes; our own code returns errors.
pub fn contain_panics<T>(input: impl Display, read: impl FnOnce() -> Result<T>) -> Result<T> {
    install_quiet_hook();
    let outer = CONTAINED.with(|c| c.replace(true));
    // The state `read` leaves behind after a panic is dropped with it: nothing it touched is used
    // again, so unwind safety is not a concern.
    let result = panic::catch_unwind(AssertUnwindSafe(read));
    CONTAINED.with(|c| c.set(outer));
    result.unwrap_or_else(|payload| {
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".into());
        Err(anyhow!(
            "{input} is damaged: its reader gave up on malformed data ({message})"
        ))
    })
}

/// Wraps the process's panic hook once so that panics inside `contain_panics` print nothing;
/// every other panic is printed as before.
fn install_quiet_hook() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if !CONTAINED.with(Cell::get) {
                previous(info);
            }
        }));
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_an_error_naming_the_input() {
        let err = contain_panics("data.parquet", || -> Result<()> {
            panic!("index out of bounds")
        })
        .unwrap_err();
        let message = format!("{err:#}");
        assert!(
            message.contains("data.parquet is damaged") && message.contains("index out of bounds"),
            "{message}"
        );
        assert_eq!(contain_panics("x", || Ok(7)).unwrap(), 7);
        // Errors pass through unchanged.
        let err = contain_panics("x", || -> Result<()> { Err(anyhow!("plain")) }).unwrap_err();
        assert_eq!(err.to_string(), "plain");
    }
}
