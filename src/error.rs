//! Errors a user can fix (bad input) are kept apart from internal failures so the CLI can
//! exit with code 2 and a one-line message naming the field, the value and what is accepted.

/// Bad user input, one line: `invalid <field>: <what was wrong>; accepted <what would be>`.
/// `field` is named as the user wrote it (a flag, a config key, a grid key; see
/// [`rename_field`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InputError {
    /// A number outside its range.
    #[error("invalid {field}: {value} is out of range; accepted {accepted}")]
    OutOfRange {
        field: String,
        value: String,
        /// the range, as `min..=max`
        accepted: String,
    },
    /// A value that is not one of those accepted (a name, a format, a combination).
    #[error("invalid {field}: {value}; accepted {accepted}")]
    Unaccepted {
        field: String,
        /// the value given, and what is wrong with it
        value: String,
        accepted: String,
    },
    /// A refusal that names no accepted alternative.
    #[error("invalid {field}: {message}")]
    Refused { field: String, message: String },
}

impl InputError {
    /// From a message in the house form `<value ...>; accepted <...>` (or `<value> is out of
    /// range; accepted <range>`), kept as its parts; any other message is a [`Self::Refused`].
    /// The error's text is `invalid <field>: <message>` in every case.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        let (field, message) = (field.into(), message.into());
        match message.split_once("; accepted ") {
            Some((value, accepted)) => match value.strip_suffix(" is out of range") {
                Some(v) => Self::OutOfRange {
                    field,
                    value: v.to_string(),
                    accepted: accepted.to_string(),
                },
                None => Self::Unaccepted {
                    field,
                    value: value.to_string(),
                    accepted: accepted.to_string(),
                },
            },
            None => Self::Refused { field, message },
        }
    }

    /// The field as the user wrote it.
    pub fn field(&self) -> &str {
        match self {
            Self::OutOfRange { field, .. }
            | Self::Unaccepted { field, .. }
            | Self::Refused { field, .. } => field,
        }
    }

    /// What follows `invalid <field>: ` in the message.
    pub fn message(&self) -> String {
        let text = self.to_string();
        text[format!("invalid {}: ", self.field()).len()..].to_string()
    }

    /// The same error under another field name.
    fn renamed(self, to: String) -> Self {
        match self {
            Self::OutOfRange {
                value, accepted, ..
            } => Self::OutOfRange {
                field: to,
                value,
                accepted,
            },
            Self::Unaccepted {
                value, accepted, ..
            } => Self::Unaccepted {
                field: to,
                value,
                accepted,
            },
            Self::Refused { message, .. } => Self::Refused { field: to, message },
        }
    }
}

/// Shorthand for returning an [`InputError`] wrapped in `anyhow`.
pub fn input_err<T>(field: &str, message: impl Into<String>) -> anyhow::Result<T> {
    Err(InputError::new(field, message).into())
}

/// Check that an integer size lies in `[min, max]`; the message states the accepted range.
pub fn check_range(field: &str, value: u64, min: u64, max: u64) -> anyhow::Result<()> {
    if value < min || value > max {
        return Err(InputError::OutOfRange {
            field: field.to_string(),
            value: value.to_string(),
            accepted: format!("{min}..={max}"),
        }
        .into());
    }
    Ok(())
}

/// Renames the field of an [`InputError`] to the name the user wrote it under (a config.json
/// key, a `--flag`), leaving other errors alone. Validation names the spec's own fields; the
/// places where specs enter know what the user called them.
pub fn rename_field(err: anyhow::Error, rename: impl Fn(&str) -> Option<String>) -> anyhow::Error {
    match err.downcast::<InputError>() {
        Ok(e) => match rename(e.field()) {
            Some(field) => e.renamed(field).into(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_keep_their_parts_and_their_text() {
        let e = InputError::new("batch", "0 is out of range; accepted 1..=4096");
        assert_eq!(
            e,
            InputError::OutOfRange {
                field: "batch".into(),
                value: "0".into(),
                accepted: "1..=4096".into()
            }
        );
        assert_eq!(
            e.to_string(),
            "invalid batch: 0 is out of range; accepted 1..=4096"
        );
        let e = InputError::new("device", "'tpu' is unknown; accepted cpu, cuda:N");
        assert!(matches!(&e, InputError::Unaccepted { value, accepted, .. }
            if value == "'tpu' is unknown" && accepted == "cpu, cuda:N"));
        assert_eq!(
            e.to_string(),
            "invalid device: 'tpu' is unknown; accepted cpu, cuda:N"
        );
        assert_eq!(e.message(), "'tpu' is unknown; accepted cpu, cuda:N");
        let e = InputError::new("data", "empty file");
        assert_eq!(e.to_string(), "invalid data: empty file");
        assert_eq!(e.field(), "data");
    }

    #[test]
    fn check_range_names_value_and_range_and_exits_2() {
        assert!(check_range("seq", 8, 1, 8).is_ok());
        let e = check_range("seq", 9, 1, 8).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid seq: 9 is out of range; accepted 1..=8"
        );
        assert_eq!(exit_code(&e), 2);
        assert_eq!(exit_code(&anyhow::anyhow!("disk full")), 1);
        let wrapped = e.context("planning");
        assert_eq!(exit_code(&wrapped), 2);
    }

    #[test]
    fn renaming_keeps_the_variant() {
        let e = check_range("batch", 0, 1, 8).unwrap_err();
        let e = rename_field(e, |f| (f == "batch").then(|| "--batch".to_string()));
        let ie = e.downcast_ref::<InputError>().unwrap();
        assert!(matches!(ie, InputError::OutOfRange { field, .. } if field == "--batch"));
        let e = rename_field(anyhow::anyhow!("other"), |_| Some("x".into()));
        assert_eq!(e.to_string(), "other");
    }
}
