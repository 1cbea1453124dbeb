//! Errors a user can act on: one line saying what and why, with the value,
//! and a hint line saying what to do. `main` prints them as
//! `memtrace: …` / `hint: …` and exits with status 2.

use std::fmt;

/// A failure explained for the person running memtrace.
#[derive(Debug)]
pub struct UserError {
    /// What went wrong, naming the offending value.
    pub message: String,
    /// What to do about it.
    pub hint: String,
}

impl UserError {
    /// An error with its hint.
    pub fn new(message: impl Into<String>, hint: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            hint: hint.into(),
        }
    }
}

impl fmt::Display for UserError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for UserError {}

/// Shorthand for results whose error is for the user.
pub type Result<T> = std::result::Result<T, UserError>;
