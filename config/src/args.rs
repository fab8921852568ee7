//! Command-line flag splitting shared by `spur proxy` and `spur control`: `--flag value`
//! and `--flag=value` both work, and a missing value is an error that names the flag.

/// Walks `args`, yielding each flag; [`Flags::value`] takes the flag's value.
pub struct Flags<'a> {
    it: std::slice::Iter<'a, String>,
    inline: Option<String>,
}

impl<'a> Flags<'a> {
    pub fn new(args: &'a [String]) -> Flags<'a> {
        Flags {
            it: args.iter(),
            inline: None,
        }
    }

    /// The next flag (without an inline `=value`, which [`Flags::value`] then returns).
    pub fn next_flag(&mut self) -> Option<&'a str> {
        let arg = self.it.next()?;
        match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => {
                self.inline = Some(v.to_string());
                Some(f)
            }
            _ => {
                self.inline = None;
                Some(arg.as_str())
            }
        }
    }

    /// The value of the flag just returned: inline, else the next argument.
    pub fn value(&mut self, name: &str) -> Result<String, String> {
        self.inline
            .take()
            .or_else(|| self.it.next().cloned())
            .ok_or_else(|| format!("{name} needs a value"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_forms_and_missing_values() {
        let args: Vec<String> = ["--a", "1", "--b=2", "-x", "--c"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let mut f = Flags::new(&args);
        assert_eq!(f.next_flag(), Some("--a"));
        assert_eq!(f.value("--a").unwrap(), "1");
        assert_eq!(f.next_flag(), Some("--b"));
        assert_eq!(f.value("--b").unwrap(), "2");
        assert_eq!(f.next_flag(), Some("-x"));
        assert_eq!(f.next_flag(), Some("--c"));
        assert_eq!(f.value("--c").unwrap_err(), "--c needs a value");
        assert_eq!(f.next_flag(), None);
    }

    #[test]
    fn only_a_flag_has_an_inline_value() {
        let args: Vec<String> = ["--a", "k=v", "--b"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let mut f = Flags::new(&args);
        assert_eq!(f.next_flag(), Some("--a"));
        assert_eq!(f.next_flag(), Some("k=v"), "a plain argument stays whole");
        assert_eq!(f.next_flag(), Some("--b"));
        assert!(f.value("--b").is_err(), "no value left over from `k=v`");
    }
}
