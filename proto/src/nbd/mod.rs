//! The NBD protocol's pure parts: the wire format of the handshake and the transmission
//! phase ([`proto`]), and NBD URIs ([`uri`]). They read and write byte streams and
//! strings only, with no sockets and no io_uring, so the nbd target (ublkd-targets) and
//! the fuzzers (fuzz/) share them without the target's dependencies.

pub mod proto;
pub mod uri;

pub use uri::{Address, NbdUri};
