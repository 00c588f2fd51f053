//! The alert webhook a policy names (`settings.alert_webhook`): checked when the policy loads, so a bad URL
//! is a policy error with its position, not an alert lost later. The health room POSTs the alerts.

/// Checks a webhook URL: `http://` or `https://`, a host, no credentials in it.
pub fn parse_url(url: &str) -> Result<url::Url, String> {
    crate::client::parse_url(url, "webhook")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = parse_url("http://10.0.0.1:9000/hook").unwrap();
        assert_eq!((u.port(), u.path()), (Some(9000), "/hook"));
        assert_eq!(
            parse_url("https://ops.example")
                .unwrap()
                .port_or_known_default(),
            Some(443)
        );
        assert!(parse_url("ftp://x/").is_err());
        assert!(parse_url("http://u:p@x/").is_err());
        assert!(parse_url("http://").is_err());
        assert!(parse_url("http://x:notaport/").is_err());
    }
}
