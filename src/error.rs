//! Errors a user can fix (bad input) are kept apart from internal failures so the CLI can
//! exit with code 2 and a one-line message naming the field and what is accepted.

use std::fmt;

/// Bad user input: names the offending field and what would have been accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputError {
    pub field: String,
    pub message: String,
}

impl InputError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for InputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid {}: {}", self.field, self.message)
    }
}

impl std::error::Error for InputError {}

/// Shorthand for returning an [`InputError`] wrapped in `anyhow`.
pub fn input_err<T>(field: &str, message: impl Into<String>) -> anyhow::Result<T> {
    Err(InputError::new(field, message).into())
}

/// Check that an integer size lies in `[min, max]`; the message states the accepted range.
pub fn check_range(field: &str, value: u64, min: u64, max: u64) -> anyhow::Result<()> {
    if value < min || value > max {
        return input_err(
            field,
            format!("{value} is out of range; accepted {min}..={max}"),
        );
    }
    Ok(())
}

/// Renames the field of an [`InputError`] to the name the user wrote it under (a config.json
/// key, a `--flag`), leaving other errors alone. Validation names the spec's own fields; the
/// places where specs enter know what the user called them.
pub fn rename_field(err: anyhow::Error, rename: impl Fn(&str) -> Option<String>) -> anyhow::Error {
    match err.downcast::<InputError>() {
        Ok(e) => match rename(&e.field) {
            Some(field) => InputError::new(field, e.message).into(),
            None => e.into(),
        },
        Err(other) => other,
    }
}

/// Exit code for an error chain: 2 when any cause is an [`InputError`], 1 otherwise.
pub fn exit_code(err: &anyhow::Error) -> i32 {
    if err
        .chain()
        .any(|c| c.downcast_ref::<InputError>().is_some())
    {
        2
    } else {
        1
    }
}
