//! The iSCSI room: slot disks as iSCSI targets, for firmware that boots whole-disk images (iPXE
//! `sanboot`) and for the operating systems that then attach the same disk.
//!
//! Built as sans-IO cores with a thin shell, like the NBD room. So far: [`pdu`], framing and the PDUs
//! of RFC 7143; [`login`], the login negotiation (CHAP, mutual CHAP, operational keys); and [`scsi`],
//! the block device (CDB in, status, sense and data out); and [`session`], the full feature phase of a
//! connection (command numbering, Data-In, R2T, task management, SendTargets, logout); [`server`], the
//! shell (a thread per connection, revocation when a node leaves its slot, session reinstatement).

pub mod login;
pub mod pdu;
pub mod scsi;
pub mod server;
pub mod session;

pub use server::{IscsiServer, TargetSource};
