//! Name rules for scopes and streams: 1 to 64 characters from [A-Za-z0-9._-], not starting
//! with '.' or '-'. Names appear in segment names, log records, keys and tier-2 paths.

use sluice_net::constants::NAME_BYTES_MAX;

/// Checks a scope or stream name; the error says what is wrong.
pub fn validate(kind: &str, name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("{kind} name is empty"));
    }
    if name.len() > NAME_BYTES_MAX {
        return Err(format!("{kind} name '{name}' is {} characters long; the limit is {NAME_BYTES_MAX}", name.len()));
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        return Err(format!("{kind} name '{name}' contains '{c}'; allowed are letters, digits, '.', '_' and '-'"));
    }
    if name.starts_with('.') || name.starts_with('-') {
        return Err(format!("{kind} name '{name}' must not start with '.' or '-'"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::validate;

    #[test]
    fn names() {
        assert!(validate("scope", "my-scope_1.x").is_ok());
        assert!(validate("scope", "").is_err());
        assert!(validate("scope", "a/b").unwrap_err().contains("'/'"));
        assert!(validate("scope", ".hidden").is_err());
        assert!(validate("scope", &"x".repeat(65)).is_err());
    }
}
