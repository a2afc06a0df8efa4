//! The loop target's queue: one request at a time becomes READ/WRITE (or their fixed
//! forms), fsync, fallocate SQEs on the backing file, continued when short.

use crate::{Completion, IoBuf, IoDesc, Outcome, Owner, QueueTarget, Ring};
use io_uring::{opcode, squeue, types};
use std::io;

/// Labels of the SQEs this target pushes.
pub(super) const STEP_RW: u16 = 1;
pub(super) const STEP_FLUSH: u16 = 2;
pub(super) const STEP_DISCARD: u16 = 3;
pub(super) const STEP_WRITE_ZEROES: u16 = 4;

pub(super) struct LoopQueue {
    pub(super) file: types::Fixed,
    /// Bytes of each tag's read or write done so far.
    pub(super) done: Vec<u32>,
    pub(super) read_only: bool,
    pub(super) punch_hole: bool,
    pub(super) zero_range: bool,
}

/// Pushes `sqe` for `io`, or asks to be called again when the ring has room.
fn submit(ring: &mut dyn Ring, io: &IoDesc, step: u16, sqe: squeue::Entry) -> Outcome {
    // SAFETY: every SQE this target builds points only at the request's own buffer,
    // which stays valid until the request is committed; the queue commits only after
    // this SQE's completion has come back through `complete`.
    match unsafe { ring.push(io.tag, step, sqe) } {
        Ok(()) => Outcome::Queued,
        Err(_) => Outcome::Busy,
    }
}

impl LoopQueue {
    /// The READ/WRITE SQE for the part of `io` not done yet.
    fn rw_sqe(&self, io: &IoDesc, buf: IoBuf) -> Option<squeue::Entry> {
        let done = self.done[usize::from(io.tag)];
        let offset = io.offset + u64::from(done);
        let left = io.len - done;
        let write = matches!(io.op, crate::BlockOp::Write);
        let rw_flags = if write && io.flags.fua {
            libc::RWF_DSYNC
        } else {
            0
        };
        let sqe = match (write, buf) {
            (false, IoBuf::User { addr, .. }) => {
                opcode::Read::new(self.file, addr.wrapping_add(done as usize), left)
                    .offset(offset)
                    .build()
            }
            (true, IoBuf::User { addr, .. }) => {
                opcode::Write::new(self.file, addr.wrapping_add(done as usize), left)
                    .offset(offset)
                    .rw_flags(rw_flags)
                    .build()
            }
            (write, IoBuf::Fixed { .. } | IoBuf::Pages { .. }) => {
                let (index, addr) = buf.registered()?;
                let at = addr + u64::from(done);
                if write {
                    opcode::WriteFixed::new(self.file, at as *const u8, left, index)
                        .offset(offset)
                        .rw_flags(rw_flags)
                        .build()
                } else {
                    opcode::ReadFixed::new(self.file, at as *mut u8, left, index)
                        .offset(offset)
                        .build()
                }
            }
            (_, IoBuf::None) => return None,
        };
        Some(sqe)
    }

    fn start_rw(&mut self, io: &IoDesc, buf: IoBuf, ring: &mut dyn Ring) -> Outcome {
        if io.len == 0 {
            return Outcome::Done(0);
        }
        self.done[usize::from(io.tag)] = 0;
        self.continue_rw(io, buf, ring)
    }

    fn continue_rw(&mut self, io: &IoDesc, buf: IoBuf, ring: &mut dyn Ring) -> Outcome {
        match self.rw_sqe(io, buf) {
            Some(sqe) => submit(ring, io, STEP_RW, sqe),
            None => Outcome::Done(-libc::EINVAL),
        }
    }

    fn fallocate(&self, io: &IoDesc, step: u16, mode: i32, ring: &mut dyn Ring) -> Outcome {
        let sqe = opcode::Fallocate::new(self.file, u64::from(io.len))
            .offset(io.offset)
            .mode(mode | libc::FALLOC_FL_KEEP_SIZE)
            .build();
        submit(ring, io, step, sqe)
    }
}

impl QueueTarget for LoopQueue {
    fn read(&mut self, io: &IoDesc, buf: IoBuf, ring: &mut dyn Ring) -> Outcome {
        self.start_rw(io, buf, ring)
    }

    fn write(&mut self, io: &IoDesc, buf: IoBuf, ring: &mut dyn Ring) -> Outcome {
        if self.read_only {
            return Outcome::Done(-libc::EROFS);
        }
        self.start_rw(io, buf, ring)
    }

    fn flush(&mut self, io: &IoDesc, ring: &mut dyn Ring) -> Outcome {
        let sqe = opcode::Fsync::new(self.file)
            .flags(types::FsyncFlags::DATASYNC)
            .build();
        submit(ring, io, STEP_FLUSH, sqe)
    }

    fn discard(&mut self, io: &IoDesc, ring: &mut dyn Ring) -> Outcome {
        if self.read_only || !self.punch_hole {
            return Outcome::Done(-libc::EOPNOTSUPP);
        }
        self.fallocate(io, STEP_DISCARD, libc::FALLOC_FL_PUNCH_HOLE, ring)
    }

    fn write_zeroes(&mut self, io: &IoDesc, ring: &mut dyn Ring) -> Outcome {
        if self.read_only {
            return Outcome::Done(-libc::EROFS);
        }
        // NOUNMAP asks to keep the range allocated: ZERO_RANGE. Otherwise a hole reads
        // back as zeroes and frees space.
        let mode = if self.zero_range && (io.flags.no_unmap || !self.punch_hole) {
            libc::FALLOC_FL_ZERO_RANGE
        } else if self.punch_hole {
            libc::FALLOC_FL_PUNCH_HOLE
        } else {
            return Outcome::Done(-libc::EOPNOTSUPP);
        };
        self.fallocate(io, STEP_WRITE_ZEROES, mode, ring)
    }

    fn complete(&mut self, done: Completion, ring: &mut dyn Ring) -> Outcome {
        // Every SQE of this target belongs to a request.
        let Owner::Request(io, buf) = done.owner else {
            return Outcome::Queued;
        };
        let (io, step, res) = (&io, done.step, done.res);
        if res == -libc::EAGAIN {
            // Try the same operation again.
            return match step {
                STEP_RW => self.continue_rw(io, buf, ring),
                STEP_FLUSH => self.flush(io, ring),
                STEP_DISCARD => self.discard(io, ring),
                _ => self.write_zeroes(io, ring),
            };
        }
        if res < 0 {
            log::debug!(
                "tag {}: {:?} at {} failed: {}",
                io.tag,
                io.op,
                io.offset,
                io::Error::from_raw_os_error(-res)
            );
            return Outcome::Done(res);
        }
        if step != STEP_RW {
            return Outcome::Done(0);
        }
        if res == 0 {
            // The backing file ended early (it shrank under us).
            log::warn!(
                "tag {}: {:?} at {}: unexpected end of the backing file",
                io.tag,
                io.op,
                io.offset
            );
            return Outcome::Done(-libc::EIO);
        }
        let done = &mut self.done[usize::from(io.tag)];
        *done += res as u32;
        if *done >= io.len {
            Outcome::Done(io.len as i32)
        } else {
            self.continue_rw(io, buf, ring)
        }
    }
}
