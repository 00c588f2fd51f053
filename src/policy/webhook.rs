//! The alert webhook a policy names (`settings.alert_webhook`): checked when the policy loads, and split
//! into where it goes for the health room, which POSTs the alerts.

/// Where a webhook goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `host:port`.
    pub authority: String,
    pub path: String,
}

/// Checks and splits an `http://host[:port]/path` URL.
pub fn parse_url(url: &str) -> Result<Target, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("`{url}`: only http:// webhooks are supported"))?;
    let (auth, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if auth.is_empty() || auth.contains('@') || path.contains(char::is_whitespace) {
        return Err(format!("`{url}` is not a usable http:// URL"));
    }
    let authority = if auth
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        auth.to_string()
    } else if auth.contains(':') && !auth.ends_with(']') {
        return Err(format!("`{url}`: bad port"));
    } else {
        format!("{auth}:80")
    };
    Ok(Target {
        authority,
        path: path.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("http://10.0.0.1:9000/hook").unwrap(),
            Target {
                authority: "10.0.0.1:9000".into(),
                path: "/hook".into()
            }
        );
        assert_eq!(
            parse_url("http://ops.example").unwrap().authority,
            "ops.example:80"
        );
        assert!(parse_url("https://x/").is_err());
        assert!(parse_url("http://u:p@x/").is_err());
        assert!(parse_url("http:///x").is_err());
        assert!(parse_url("http://x:notaport/").is_err());
    }
}
