//! The HTTP room's counters and how they read in `/metrics`.

use std::sync::Arc;

use crate::metrics::{write_counter, Counter, Report};

/// Request counters.
#[derive(Default)]
pub struct HttpStats {
    pub requests: Counter,
    pub scripts: Counter,
    pub files: Counter,
    pub not_found: Counter,
    pub bad_requests: Counter,
    pub unauthorized: Counter,
    /// Connections closed at once: `max_connections` reached.
    pub refused_full: Counter,
    /// Connections closed at once: `max_connections_per_peer` reached.
    pub refused_per_peer: Counter,
    /// Connections closed for a request head (or first request) that did not arrive in `header_timeout`.
    pub header_timeouts: Counter,
    /// Connections closed after `idle_timeout` with nothing happening.
    pub idle_closed: Counter,
    /// Connections open now, from both listeners.
    pub open: std::sync::OnceLock<[Arc<crate::conn::Gate>; 2]>,
}

impl Report for HttpStats {
    fn report(&self, out: &mut String) {
        write_counter(
            out,
            "corral_http_requests_total",
            "HTTP requests received",
            self.requests.get(),
        );
        write_counter(
            out,
            "corral_http_node_scripts_total",
            "Per-node iPXE scripts served",
            self.scripts.get(),
        );
        write_counter(
            out,
            "corral_http_files_total",
            "Boot file responses",
            self.files.get(),
        );
        write_counter(
            out,
            "corral_http_not_found_total",
            "Responses 404",
            self.not_found.get(),
        );
        write_counter(
            out,
            "corral_http_bad_requests_total",
            "Responses 400",
            self.bad_requests.get(),
        );
        write_counter(
            out,
            "corral_http_unauthorized_total",
            "API requests refused for a missing or wrong bearer token",
            self.unauthorized.get(),
        );
        out.push_str(
            "# HELP corral_http_refused_busy_total HTTP connections closed at once because a cap was reached\n# TYPE corral_http_refused_busy_total counter\n",
        );
        for (reason, v) in [
            ("max_connections", &self.refused_full),
            ("max_connections_per_peer", &self.refused_per_peer),
        ] {
            out.push_str(&format!(
                "corral_http_refused_busy_total{{reason=\"{reason}\"}} {}\n",
                v.get()
            ));
        }
        write_counter(
            out,
            "corral_http_header_timeouts_total",
            "HTTP connections closed for a request head not sent within header_timeout",
            self.header_timeouts.get(),
        );
        write_counter(
            out,
            "corral_http_idle_closed_total",
            "HTTP connections closed after idle_timeout with no request or no byte moving",
            self.idle_closed.get(),
        );
        if let Some(gates) = self.open.get() {
            crate::metrics::write_gauge(
                out,
                "corral_http_connections_open",
                "HTTP connections open now (boot and operator listeners)",
                gates.iter().map(|g| g.open() as u64).sum(),
            );
        }
    }
}
