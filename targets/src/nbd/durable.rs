//! What the server is asked, per request, so that a request completes as durable as
//! the kernel's device was promised: the device's write cache and FUA were set from the
//! server's flags when the device was added, and a server may advertise other ones when
//! a crashed ublkd recovers the device (a reconnect demands the same flags, `conn.rs`).
//!
//! - The server caches writes (SEND_FLUSH) but the device was created without a write
//!   cache, so the kernel sends no FLUSH: every write, write-zeroes and trim is made
//!   durable before it completes ([`Durability::every_write`]).
//! - The kernel asks for FUA and the server cannot do it (no SEND_FUA): the write is
//!   followed by a flush.
//! - The server does not cache (no SEND_FLUSH): a FLUSH has nothing to do and is not
//!   sent (the NBD spec forbids it; strict servers fail it), and FUA is not needed.

use super::proto;
use crate::{BlockOp, IoDesc};

/// How a queue makes requests durable on its server.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Durability {
    /// The server advertises NBD_FLAG_SEND_FLUSH: it may answer writes before they
    /// are durable.
    pub(super) flush: bool,
    /// The server advertises NBD_FLAG_SEND_FUA.
    pub(super) fua: bool,
    /// Every write, write-zeroes and trim must be durable when it completes (the
    /// device is write-through, `Target::write_through`).
    pub(super) every_write: bool,
}

/// What a request becomes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Plan {
    /// One command with these flags; its reply completes the request.
    Send { cmd: u16, flags: u16 },
    /// The command, then (once it has succeeded) an NBD_CMD_FLUSH; the flush's reply
    /// completes the request.
    SendThenFlush { cmd: u16, flags: u16 },
    /// Nothing to send: the request completes with this result.
    Done(i32),
}

impl Durability {
    /// What `show` says of the device's write cache.
    pub(super) fn describe(&self) -> String {
        let how = if self.fua {
            "sent with FUA"
        } else {
            "followed by a flush"
        };
        match (self.flush, self.every_write) {
            (false, _) => "none: the server answers a write once it is durable".into(),
            (true, false) => "volatile, FLUSH is sent to the server".into(),
            (true, true) => format!(
                "none on the device, which was created without one: every write is {how} \
                 before it completes"
            ),
        }
    }

    /// What request `io` becomes on the wire.
    pub(super) fn plan(&self, io: &IoDesc) -> Plan {
        let (cmd, mut flags) = match io.op {
            BlockOp::Read => (proto::CMD_READ, 0),
            BlockOp::Write => (proto::CMD_WRITE, 0),
            BlockOp::Flush if !self.flush => return Plan::Done(0),
            BlockOp::Flush => {
                return Plan::Send {
                    cmd: proto::CMD_FLUSH,
                    flags: 0,
                }
            }
            BlockOp::Discard => (proto::CMD_TRIM, 0),
            BlockOp::WriteZeroes if io.flags.no_unmap => {
                (proto::CMD_WRITE_ZEROES, proto::CMD_FLAG_NO_HOLE)
            }
            BlockOp::WriteZeroes => (proto::CMD_WRITE_ZEROES, 0),
            BlockOp::Other(_) => return Plan::Done(-libc::EOPNOTSUPP),
        };
        let durable = match io.op {
            BlockOp::Write | BlockOp::WriteZeroes => io.flags.fua || self.every_write,
            BlockOp::Discard => self.every_write,
            _ => false,
        };
        if !durable || !self.flush {
            // Without a cache on the server, its answer already means durable.
            return Plan::Send { cmd, flags };
        }
        if self.fua {
            flags |= proto::CMD_FLAG_FUA;
            Plan::Send { cmd, flags }
        } else {
            Plan::SendThenFlush { cmd, flags }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::IoFlags;

    fn io(op: BlockOp, fua: bool) -> IoDesc {
        IoDesc {
            tag: 0,
            op,
            flags: IoFlags {
                fua,
                ..IoFlags::default()
            },
            offset: 4096,
            len: 4096,
        }
    }

    const W: u16 = proto::CMD_WRITE;
    const FUA: u16 = proto::CMD_FLAG_FUA;

    #[test]
    fn a_device_created_from_these_flags_gets_what_it_asks_for() {
        let caching = Durability {
            flush: true,
            fua: true,
            every_write: false,
        };
        let send = |cmd, flags| Plan::Send { cmd, flags };
        assert_eq!(caching.plan(&io(BlockOp::Write, false)), send(W, 0));
        assert_eq!(caching.plan(&io(BlockOp::Write, true)), send(W, FUA));
        assert_eq!(
            caching.plan(&io(BlockOp::Flush, false)),
            send(proto::CMD_FLUSH, 0)
        );
        assert_eq!(
            caching.plan(&io(BlockOp::Discard, false)),
            send(proto::CMD_TRIM, 0)
        );
        let mut zeroes = io(BlockOp::WriteZeroes, true);
        zeroes.flags.no_unmap = true;
        assert_eq!(
            caching.plan(&zeroes),
            send(proto::CMD_WRITE_ZEROES, proto::CMD_FLAG_NO_HOLE | FUA)
        );
        assert_eq!(
            caching.plan(&io(BlockOp::Other(99), false)),
            Plan::Done(-libc::EOPNOTSUPP)
        );
    }

    #[test]
    fn a_write_through_device_over_a_caching_server_makes_every_write_durable() {
        let with_fua = Durability {
            flush: true,
            fua: true,
            every_write: true,
        };
        assert_eq!(
            with_fua.plan(&io(BlockOp::Write, false)),
            Plan::Send { cmd: W, flags: FUA }
        );
        assert_eq!(
            with_fua.plan(&io(BlockOp::Discard, false)),
            Plan::Send {
                cmd: proto::CMD_TRIM,
                flags: FUA
            }
        );
        let flush_only = Durability {
            fua: false,
            ..with_fua
        };
        for op in [BlockOp::Write, BlockOp::WriteZeroes, BlockOp::Discard] {
            assert!(matches!(
                flush_only.plan(&io(op, false)),
                Plan::SendThenFlush { flags: 0, .. }
            ));
        }
        assert_eq!(
            flush_only.plan(&io(BlockOp::Read, false)),
            Plan::Send {
                cmd: proto::CMD_READ,
                flags: 0
            }
        );
    }

    #[test]
    fn fua_without_the_servers_fua_is_a_flush_and_a_server_without_cache_needs_none() {
        let flush_only = Durability {
            flush: true,
            fua: false,
            every_write: false,
        };
        assert_eq!(
            flush_only.plan(&io(BlockOp::Write, true)),
            Plan::SendThenFlush { cmd: W, flags: 0 }
        );
        let no_cache = Durability::default();
        assert_eq!(no_cache.plan(&io(BlockOp::Flush, false)), Plan::Done(0));
        assert_eq!(
            no_cache.plan(&io(BlockOp::Write, true)),
            Plan::Send { cmd: W, flags: 0 }
        );
        let no_cache_write_through = Durability {
            every_write: true,
            ..no_cache
        };
        assert_eq!(
            no_cache_write_through.plan(&io(BlockOp::Write, false)),
            Plan::Send { cmd: W, flags: 0 }
        );
    }
}
