//! How a queue talks to the driver about its tags: the one interface the queue loop
//! calls, in front of the two command paths the driver offers.
//!
//! - [`PerTag`]: FETCH_REQ / COMMIT_AND_FETCH_REQ, one command per request.
//! - [`Batch`]: UBLK_F_BATCH_IO (Linux 7.0): PREP_IO_CMDS once, multishot
//!   FETCH_IO_CMDS delivering lists of tags, one COMMIT_IO_CMDS per loop turn.
//!
//! Which one a queue uses is a flag of the device (UBLK_F_BATCH_IO), so a recovered
//! device is served the way it was created. Either way the loop gets delivered tags
//! from [`Commands::completed`], hands results to [`Commands::commit`], and calls
//! [`Commands::flush`] once per turn before it enters the ring.

use super::batch::Batch;
use super::per_tag::PerTag;
use super::user_data::{Kind, UserData};
use io_uring::IoUring;
use std::io;
use ublkd_proto::BufferMode;

pub enum Commands {
    PerTag(PerTag),
    Batch(Box<Batch>),
}

impl Commands {
    pub fn new(
        batch: bool,
        dev_id: u32,
        qid: u16,
        depth: u16,
        mode: BufferMode,
        addrs: Vec<u64>,
    ) -> io::Result<Self> {
        Ok(if batch {
            Commands::Batch(Box::new(Batch::new(dev_id, qid, depth, mode, addrs)?))
        } else {
            Commands::PerTag(PerTag::new(dev_id, qid, depth, mode, addrs))
        })
    }

    /// Before the queue's thread ends: nothing may be left for the driver to write
    /// into after it (`Batch::withdraw_buffers`).
    pub fn withdraw(&mut self, ring: &mut IoUring) {
        if let Commands::Batch(b) = self {
            b.withdraw_buffers(ring);
        }
    }

    /// The memory the driver writes into or reads from by address, as (address,
    /// length) regions: the batch path's fetch buffers and commit arrays.
    pub fn regions(&self) -> Vec<(*mut u8, usize)> {
        match self {
            Commands::PerTag(_) => Vec::new(),
            Commands::Batch(b) => b.regions(),
        }
    }

    /// Whether a completion of this kind belongs to the command path.
    pub fn owns(kind: Kind) -> bool {
        matches!(
            kind,
            Kind::Command
                | Kind::UnregBuf
                | Kind::BatchPrep
                | Kind::BatchFetch
                | Kind::BatchCommit
                | Kind::FetchBuf
        )
    }

    /// Hands every tag to the driver; requests may arrive after the next submit.
    pub fn start(&mut self, ring: &mut IoUring) -> io::Result<()> {
        match self {
            Commands::PerTag(p) => p.start(ring),
            Commands::Batch(b) => b.start(ring),
        }
    }

    /// Gives `tag`'s result back to the driver, which re-arms the tag. `registered`:
    /// the queue registered the request's pages, which are unregistered first.
    pub fn commit(&mut self, ring: &mut IoUring, tag: u16, res: i32, registered: bool) {
        match self {
            Commands::PerTag(p) => p.commit(ring, tag, res, registered),
            Commands::Batch(b) => b.commit(ring, tag, res, registered),
        }
    }

    /// End of a loop turn: posts what is still to go out. `take_new` false (stopping,
    /// handing over): no command that would take new requests.
    pub fn flush(&mut self, ring: &mut IoUring, take_new: bool) {
        match self {
            Commands::PerTag(p) => p.flush(ring),
            Commands::Batch(b) => b.flush(ring, take_new),
        }
    }

    /// A completion of a kind [`Commands::owns`]; delivered tags go to `delivered`.
    pub fn completed(&mut self, ud: UserData, res: i32, flags: u32, delivered: &mut Vec<u16>) {
        match self {
            Commands::PerTag(p) => p.completed(ud, res, delivered),
            Commands::Batch(b) => b.completed(ud, res, flags, delivered),
        }
    }

    /// Nothing is waiting to be committed.
    pub fn idle(&self) -> bool {
        match self {
            Commands::PerTag(p) => p.idle(),
            Commands::Batch(b) => b.idle(),
        }
    }

    /// The command path's state in one line, for a state dump (SIGUSR1).
    pub fn describe(&self) -> String {
        match self {
            Commands::PerTag(p) => p.describe(),
            Commands::Batch(b) => b.describe(),
        }
    }

    /// The driver may still deliver requests.
    pub fn armed(&self) -> bool {
        match self {
            Commands::PerTag(p) => p.armed(),
            Commands::Batch(b) => b.armed(),
        }
    }
}
