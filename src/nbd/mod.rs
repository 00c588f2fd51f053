//! The NBD room: each slot's disk and each base image served over the Network Block Device protocol.
//!
//! - [`proto`]: wire format.
//! - [`handshake`]: fixed-newstyle option haggling as a state machine (GO, INFO, EXPORT_NAME, LIST, ABORT,
//!   STARTTLS, STRUCTURED_REPLY, LIST/SET_META_CONTEXT with `base:allocation`; anything else is
//!   NBD_REP_ERR_UNSUP).
//! - [`tls`]: NBD over TLS with a pre-shared key per slot (OpenSSL; qemu and libnbd speak it).
//! - [`transmit`]: request checking and replies (READ, WRITE with FUA, FLUSH, TRIM, WRITE_ZEROES,
//!   BLOCK_STATUS, CACHE, DISC).
//! - [`server`]: the thin shell (accept loop, a thread per connection, revocation when a node leaves its
//!   slot).
//!
//! Export names: `<cluster>/<slot>` for a slot's read-write overlay, `base/<name>` for a read-only base.
//! Who may open which is the controller's decision ([`server::ExportSource`]).

pub mod handshake;
pub mod proto;
pub mod server;
pub mod tls;
pub mod transmit;

pub use server::{ExportSource, NbdServer, NbdStats};
