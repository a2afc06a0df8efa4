//! The ublkd control protocol and the pure logic shared by `ublkd` and `ublkctl`.
//!
//! One request per connection: the client writes one JSON [`Request`] terminated by a
//! newline, the daemon answers with one JSON [`Response`] line and closes the connection.

pub mod backing;
pub mod ceph_option;
pub mod features;
pub mod message;
pub mod nbd;
pub mod options;
pub mod size;
pub mod target_spec;
pub mod validate;

pub use backing::BackingId;
pub use message::*;
pub use options::*;

/// Default path of the daemon's control socket.
pub const DEFAULT_SOCKET: &str = "/run/ublkd/ublkd.sock";

/// Largest request the daemon accepts on its control socket, in bytes.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
