//! Error kinds that decide how a failure is reported.
//!
//! The engine uses `anyhow` for context chains. A request or input the caller got wrong (bad shape,
//! unknown setting, missing or mis-shaped checkpoint tensor) is wrapped in [`InvalidInput`], so the
//! CLI can exit with code 2 and the server answer 4xx; anything else is a runtime failure (exit 1).

use std::fmt;

/// A caller error: the message names the field (or tensor, or key) and, where it helps, the valid values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidInput(pub String);

impl fmt::Display for InvalidInput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for InvalidInput {}

/// Builds an `anyhow::Error` carrying [`InvalidInput`]: `invalid!("size: {} is not ...", x)`.
#[macro_export]
macro_rules! invalid {
    ($($arg:tt)*) => {
        anyhow::Error::new($crate::error::InvalidInput(format!($($arg)*)))
    };
}

/// True when any error in the chain is an [`InvalidInput`].
pub fn is_invalid_input(err: &anyhow::Error) -> bool {
    err.chain().any(|e| e.is::<InvalidInput>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn invalid_input_is_found_through_context() {
        let err: anyhow::Result<()> = Err(crate::invalid!("steps: 0 is out of range 1..=1000"));
        let err = err.context("loading request").unwrap_err();
        assert!(is_invalid_input(&err));
        let plain = anyhow::anyhow!("disk full");
        assert!(!is_invalid_input(&plain));
    }
}
