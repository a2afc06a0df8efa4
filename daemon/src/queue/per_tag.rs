//! The per-tag command path: one FETCH_REQ per tag at start, then one
//! COMMIT_AND_FETCH_REQ per request, which commits its result and waits for the tag's
//! next request. In zero copy, a request whose pages the queue registered is committed
//! hard-linked behind their UNREGISTER_IO_BUF.

use super::user_data::{encode, Kind, UserData};
use super::{buf_cmd, push_all, uapi};
use io_uring::{squeue, IoUring};
use std::collections::VecDeque;
use std::io;
use ublkd_proto::BufferMode;

pub struct PerTag {
    dev_id: u32,
    qid: u16,
    mode: BufferMode,
    /// Per tag: the daemon buffer the driver copies to and from (copy, fixed).
    addrs: Vec<u64>,
    /// Per tag: a FETCH/COMMIT command for it is with the driver.
    active: Vec<bool>,
    active_cmds: usize,
    /// Commits that found the submission queue full: (tag, result, registered).
    pending: VecDeque<(u16, i32, bool)>,
}

impl PerTag {
    pub fn describe(&self) -> String {
        format!(
            "per-tag: {} commands with the driver, {} commits waiting for room",
            self.active_cmds,
            self.pending.len()
        )
    }

    pub fn new(dev_id: u32, qid: u16, depth: u16, mode: BufferMode, addrs: Vec<u64>) -> Self {
        PerTag {
            dev_id,
            qid,
            mode,
            addrs,
            active: vec![false; usize::from(depth)],
            active_cmds: 0,
            pending: VecDeque::with_capacity(usize::from(depth)),
        }
    }

    /// The FETCH/COMMIT SQE for `tag` in this queue's buffer mode.
    fn cmd_sqe(&self, op: u32, tag: u16, result: i32) -> squeue::Entry {
        let addr = self.addrs.get(usize::from(tag)).copied().unwrap_or(0);
        let sqe = uapi::io_cmd_sqe(op, self.qid, tag, result, addr);
        let sqe = match self.mode {
            BufferMode::AutoZc => uapi::with_sqe_addr(
                sqe,
                uapi::auto_buf_reg_addr(tag, uapi::AUTO_BUF_REG_FALLBACK),
            ),
            _ => sqe,
        };
        sqe.user_data(encode(Kind::Command, tag, 0))
    }

    /// Posts FETCH_REQ, or COMMIT_AND_FETCH_REQ with `result` (behind the buffer
    /// unregistration when the request's pages are `registered` by the queue).
    fn push_cmd(
        &mut self,
        ring: &mut IoUring,
        op: u32,
        tag: u16,
        result: i32,
        registered: bool,
    ) -> bool {
        let Some(&was_active) = self.active.get(usize::from(tag)) else {
            return false;
        };
        let cmd = self.cmd_sqe(op, tag, result);
        let pushed = if registered {
            let unreg = buf_cmd(uapi::UNREGISTER_IO_BUF, Kind::UnregBuf, self.qid, tag);
            // SAFETY: neither SQE points at memory (the command payload is copied in).
            unsafe { push_all(ring, &[unreg, cmd]) }
        } else {
            // SAFETY: the payload is copied into the SQE; the buffer address it may carry
            // is the arena's, which outlives the ring.
            unsafe { push_all(ring, &[cmd]) }
        };
        if pushed && !was_active {
            self.active[usize::from(tag)] = true;
            self.active_cmds += 1;
        }
        pushed
    }

    /// Posts FETCH_REQ for every tag.
    pub fn start(&mut self, ring: &mut IoUring) -> io::Result<()> {
        for tag in 0..self.active.len() as u16 {
            if !self.push_cmd(ring, uapi::FETCH_REQ, tag, -1, false) {
                return Err(io::Error::other(
                    "submission queue full while posting FETCH_REQ",
                ));
            }
        }
        Ok(())
    }

    pub fn commit(&mut self, ring: &mut IoUring, tag: u16, res: i32, registered: bool) {
        if !self.push_cmd(ring, uapi::COMMIT_AND_FETCH_REQ, tag, res, registered) {
            self.pending.push_back((tag, res, registered));
        }
    }

    /// Retries commits that found the submission queue full.
    pub fn flush(&mut self, ring: &mut IoUring) {
        while let Some((tag, res, registered)) = self.pending.pop_front() {
            if !self.push_cmd(ring, uapi::COMMIT_AND_FETCH_REQ, tag, res, registered) {
                self.pending.push_front((tag, res, registered));
                return;
            }
        }
    }

    /// The driver answered a FETCH/COMMIT: a new request on the tag (to `delivered`),
    /// or the end of this tag.
    pub fn completed(&mut self, ud: UserData, res: i32, delivered: &mut Vec<u16>) {
        let (dev, q, tag) = (self.dev_id, self.qid, ud.tag);
        if ud.kind == Kind::UnregBuf {
            // Only failures complete (SKIP_SUCCESS); the commit behind it goes out anyway.
            log::error!(
                "dev {dev} queue {q} tag {tag}: unregistering the request buffer failed: {}",
                io::Error::from_raw_os_error(-res)
            );
            return;
        }
        if ud.kind != Kind::Command || !self.active.get(usize::from(tag)).copied().unwrap_or(false)
        {
            log::error!(
                "dev {dev} queue {q} tag {tag}: unexpected {:?} completion",
                ud.kind
            );
            return;
        }
        self.active[usize::from(tag)] = false;
        self.active_cmds -= 1;
        match res {
            uapi::IO_RES_OK => delivered.push(tag),
            uapi::IO_RES_ABORT => log::trace!("dev {dev} queue {q} tag {tag}: aborted"),
            err => log::error!(
                "dev {dev} queue {q} tag {tag}: ublk command failed: {}",
                io::Error::from_raw_os_error(-err)
            ),
        }
    }

    /// Nothing is waiting to be committed.
    pub fn idle(&self) -> bool {
        self.pending.is_empty()
    }

    /// The driver may still deliver requests.
    pub fn armed(&self) -> bool {
        self.active_cmds > 0
    }
}
