//! The agent: the small program that runs inside a booted image (`corral-agent`, started by the image's
//! init). It heartbeats the node's figures to corral, runs the image's drain hook when corral asks (the
//! application's stop command), and powers the node off or restarts it when asked. It proves a boot: the
//! first heartbeat with the token corral put on this boot's kernel command line confirms that the node
//! came up in its new role.
//!
//! Plain threads and corral's blocking HTTP client ([`crate::client`], on ureq): the agent ships into
//! tiny images, so it carries no async runtime. [`proto`] is the wire format, shared with corral's API.

pub mod groups;
pub mod proto;
pub mod run;
pub mod sample;
