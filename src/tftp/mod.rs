//! TFTP: a read-only server for iPXE binaries and other small boot files.
//!
//! `core` is the protocol, sans IO; `server` is the tokio shell. We do not use the async-tftp crate: it runs
//! on async-io rather than tokio (a second reactor in the process), has no IO-free core to test
//! exhaustively, answers from the wildcard address instead of the one the client contacted, and cannot be
//! tied to our file cache and path rules.

pub mod core;
pub mod server;

pub use server::{TftpServer, TftpStats};
