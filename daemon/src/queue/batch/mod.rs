//! The batch command path (UBLK_F_BATCH_IO, Linux 7.0): a queue's tags are registered
//! once with UBLK_U_IO_PREP_IO_CMDS; two multishot UBLK_U_IO_FETCH_IO_CMDS deliver
//! lists of tags, each list written by the driver into a provided buffer (legacy
//! PROVIDE_BUFFERS, one buffer per CQE, given back once its tags are read); the
//! results of one loop turn go back in one UBLK_U_IO_COMMIT_IO_CMDS, which also
//! re-arms those tags.
//!
//! Commit buffers: two element arrays, one filling while the other is with the driver.
//! A tag is in at most one of them (the driver delivers it again only after its
//! commit), so each holds `depth` elements and never overflows. The driver may commit
//! part of an array: its result is then the bytes it processed, or an errno when it
//! refused the first element. The rest goes back into the filling array; an element
//! the driver refuses on its own is logged with its tag and dropped (the driver only
//! refuses a tag it does not consider ours).
//!
//! Zero copy with manual registration: a request's pages are unregistered before its
//! tag is committed; the UNREGISTER_IO_BUF goes out on its own and the tag joins the
//! commit array when that completes.

mod elements;

use super::user_data::{encode, Kind, UserData};
use super::{ensure_room, push_all, uapi};
use elements::{element, header, uncommitted_from, ElemArray, ElemFormat, RawBuf};
use io_uring::{cqueue, opcode, squeue, IoUring};
use std::collections::VecDeque;
use std::io;
use ublkd_proto::BufferMode;

/// Bytes of one fetch buffer: the driver puts at most 128 tags in one CQE.
const FETCH_BUF_LEN: usize = 256;
/// The provided-buffer group of the fetch buffers (the ring is the queue's own).
const FETCH_GROUP: u16 = 0;
/// Fetch commands kept armed (as kublk and libublk do): while the driver completes
/// one, the other takes new requests.
const FETCH_CMDS: u16 = 2;

pub struct Batch {
    dev_id: u32,
    qid: u16,
    /// Per tag: the daemon buffer the driver copies to and from (copy, fixed).
    addrs: Vec<u64>,
    auto_reg: bool,
    arrays: [ElemArray; 2],
    /// The array results go into; the other one may be with the driver.
    filling: usize,
    committing: bool,
    fetch_mem: RawBuf,
    nbufs: u16,
    /// Fetch buffers whose tags were read: given back to the driver at the flush.
    to_provide: Vec<u16>,
    fetches_armed: u16,
    /// Fetch commands that ended and are to be posted again.
    fetches_wanted: u16,
    /// The driver aborted the fetch commands: the queue is going away.
    aborted: bool,
    /// Zero copy: the result of a tag waiting for its buffer's unregistration.
    unreg_result: Vec<Option<i32>>,
    /// ... and those whose UNREGISTER_IO_BUF is not posted yet.
    unreg_to_push: VecDeque<u16>,
    unregs: usize,
}

impl Batch {
    pub fn new(
        dev_id: u32,
        qid: u16,
        depth: u16,
        mode: BufferMode,
        addrs: Vec<u64>,
    ) -> io::Result<Self> {
        let fmt = ElemFormat::for_mode(mode);
        let nbufs = depth.max(8);
        Ok(Batch {
            dev_id,
            qid,
            addrs,
            auto_reg: mode == BufferMode::AutoZc,
            arrays: [ElemArray::new(fmt, depth)?, ElemArray::new(fmt, depth)?],
            filling: 0,
            committing: false,
            fetch_mem: RawBuf::new(usize::from(nbufs) * FETCH_BUF_LEN)?,
            nbufs,
            to_provide: Vec::with_capacity(usize::from(nbufs)),
            fetches_armed: 0,
            fetches_wanted: 0,
            aborted: false,
            unreg_result: vec![None; usize::from(depth)],
            unreg_to_push: VecDeque::with_capacity(usize::from(depth)),
            unregs: 0,
        })
    }

    fn element(&self, tag: u16, result: i32) -> [u8; 16] {
        let fmt = self.arrays[0].fmt;
        let addr = self.addrs.get(usize::from(tag)).copied().unwrap_or(0);
        let index = if self.auto_reg { tag } else { 0 };
        element(fmt, tag, index, result, addr)
    }

    /// Registers every tag (PREP_IO_CMDS, waited for), then provides the fetch buffers
    /// and arms the fetch commands (submitted with the caller's next submit).
    pub fn start(&mut self, ring: &mut IoUring) -> io::Result<()> {
        let depth = self.unreg_result.len() as u16;
        for tag in 0..depth {
            let e = self.element(tag, 0);
            self.arrays[0].push(&e);
        }
        let prep = self.arrays[0].sqe(uapi::PREP_IO_CMDS, self.qid, encode(Kind::BatchPrep, 0, 0));
        // SAFETY: the element array lives in `self`, which outlives the ring's use of
        // it: we wait for the command's completion below.
        if !unsafe { push_all(ring, &[prep]) } {
            return Err(io::Error::other(
                "submission queue full while posting PREP_IO_CMDS",
            ));
        }
        let res = wait_for(ring, encode(Kind::BatchPrep, 0, 0))?;
        self.arrays[0].len = 0;
        if res < 0 {
            return Err(io::Error::other(format!(
                "PREP_IO_CMDS failed: {}",
                io::Error::from_raw_os_error(-res)
            )));
        }
        // SAFETY: the fetch buffers live in `self`, which outlives the queue thread.
        if !unsafe { push_all(ring, &[self.provide_all()]) } {
            return Err(io::Error::other(
                "submission queue full while providing fetch buffers",
            ));
        }
        self.fetches_wanted = FETCH_CMDS;
        self.flush(ring, true);
        if self.fetches_armed != FETCH_CMDS {
            return Err(io::Error::other(
                "submission queue full while posting FETCH_IO_CMDS",
            ));
        }
        Ok(())
    }

    /// Gives every fetch buffer to the ring's buffer group (no completion on success).
    fn provide_all(&self) -> squeue::Entry {
        opcode::ProvideBuffers::new(
            self.fetch_mem.ptr(),
            FETCH_BUF_LEN as i32,
            self.nbufs,
            FETCH_GROUP,
            0,
        )
        .build()
        .user_data(encode(Kind::FetchBuf, 0, 0))
        .flags(squeue::Flags::SKIP_SUCCESS)
    }

    /// Queues `tag`'s result for this turn's commit; with `registered` pages, behind
    /// their unregistration.
    pub fn commit(&mut self, ring: &mut IoUring, tag: u16, res: i32, registered: bool) {
        if registered {
            if let Some(slot) = self.unreg_result.get_mut(usize::from(tag)) {
                *slot = Some(res);
                self.unregs += 1;
                self.unreg_to_push.push_back(tag);
                self.push_unregs(ring);
                return;
            }
        }
        self.queue_commit(tag, res);
    }

    fn queue_commit(&mut self, tag: u16, res: i32) {
        let e = self.element(tag, res);
        if !self.arrays[self.filling].push(&e) {
            // Cannot happen: a tag is in at most one array, and each holds depth.
            log::error!(
                "dev {} queue {} tag {tag}: commit array full; the request is lost",
                self.dev_id,
                self.qid
            );
        }
    }

    fn push_unregs(&mut self, ring: &mut IoUring) {
        while let Some(&tag) = self.unreg_to_push.front() {
            let sqe = uapi::io_cmd_sqe(uapi::UNREGISTER_IO_BUF, self.qid, tag, 0, u64::from(tag))
                .user_data(encode(Kind::UnregBuf, tag, 0));
            // SAFETY: the command carries no pointer.
            if !unsafe { push_all(ring, &[sqe]) } {
                return;
            }
            self.unreg_to_push.pop_front();
        }
    }

    /// End of a loop turn: give back read fetch buffers, re-arm ended fetch commands
    /// (unless `take_new` is false: the queue is stopping or handing over), and post
    /// the turn's commit.
    pub fn flush(&mut self, ring: &mut IoUring, take_new: bool) {
        self.push_unregs(ring);
        while let Some(&bid) = self.to_provide.last() {
            // SAFETY: bid < nbufs (checked when it was taken), so the buffer lies in
            // fetch_mem, which outlives the queue thread.
            let addr = unsafe { self.fetch_mem.ptr().add(usize::from(bid) * FETCH_BUF_LEN) };
            let sqe = opcode::ProvideBuffers::new(addr, FETCH_BUF_LEN as i32, 1, FETCH_GROUP, bid)
                .build()
                .user_data(encode(Kind::FetchBuf, 0, 0))
                .flags(squeue::Flags::SKIP_SUCCESS);
            // SAFETY: as above.
            if !unsafe { push_all(ring, &[sqe]) } {
                break;
            }
            self.to_provide.pop();
        }
        while take_new && !self.aborted && self.fetches_wanted > 0 {
            let sqe = uapi::batch_fetch_sqe(
                header(self.qid, 0, (FETCH_BUF_LEN / 2) as u16, 2),
                FETCH_GROUP,
            )
            .user_data(encode(Kind::BatchFetch, 0, 0));
            // SAFETY: the command carries no pointer; its buffers come from the group.
            if !unsafe { push_all(ring, &[sqe]) } {
                break;
            }
            self.fetches_wanted -= 1;
            self.fetches_armed += 1;
        }
        if !self.committing && self.arrays[self.filling].len > 0 && ensure_room(ring, 1) {
            let ud = encode(Kind::BatchCommit, 0, self.filling as u16);
            let sqe = self.arrays[self.filling].sqe(uapi::COMMIT_IO_CMDS, self.qid, ud);
            // SAFETY: the array stays untouched (not filling) until its completion.
            if unsafe { push_all(ring, &[sqe]) } {
                self.committing = true;
                self.filling = 1 - self.filling;
            }
        }
    }

    /// A completion of one of the batch commands; tags the driver delivered go to
    /// `delivered`.
    pub fn completed(&mut self, ud: UserData, res: i32, flags: u32, delivered: &mut Vec<u16>) {
        let (dev, q) = (self.dev_id, self.qid);
        match ud.kind {
            Kind::BatchFetch => self.fetched(res, flags, delivered),
            Kind::BatchCommit => self.committed(usize::from(ud.step) & 1, res),
            Kind::UnregBuf => {
                let tag = ud.tag;
                let Some(result) = self
                    .unreg_result
                    .get_mut(usize::from(tag))
                    .and_then(Option::take)
                else {
                    log::error!("dev {dev} queue {q} tag {tag}: unexpected unregistration");
                    return;
                };
                if res < 0 {
                    log::error!(
                        "dev {dev} queue {q} tag {tag}: unregistering the request buffer failed: {}",
                        io::Error::from_raw_os_error(-res)
                    );
                }
                self.unregs -= 1;
                self.queue_commit(tag, result);
            }
            Kind::FetchBuf => log::error!(
                "dev {dev} queue {q}: providing fetch buffers failed: {}",
                io::Error::from_raw_os_error(-res)
            ),
            _ => log::error!("dev {dev} queue {q}: unexpected {:?} completion", ud.kind),
        }
    }

    fn fetched(&mut self, res: i32, flags: u32, delivered: &mut Vec<u16>) {
        let (dev, q) = (self.dev_id, self.qid);
        if let Some(bid) = cqueue::buffer_select(flags) {
            if bid >= self.nbufs {
                log::error!("dev {dev} queue {q}: fetch completion names buffer {bid}");
            } else {
                let n = (res.max(0) as usize).min(FETCH_BUF_LEN) / 2;
                let base = usize::from(bid) * FETCH_BUF_LEN;
                for i in 0..n {
                    // SAFETY: base + 2i + 2 <= (bid + 1) * FETCH_BUF_LEN, inside
                    // fetch_mem; the driver wrote these bytes before the CQE and does
                    // not touch the buffer until we provide it again.
                    let tag = unsafe {
                        self.fetch_mem
                            .ptr()
                            .add(base + 2 * i)
                            .cast::<u16>()
                            .read_unaligned()
                    };
                    delivered.push(tag);
                }
                self.to_provide.push(bid);
            }
        }
        if cqueue::more(flags) {
            return;
        }
        self.fetches_armed = self.fetches_armed.saturating_sub(1);
        match res {
            uapi::IO_RES_ABORT => {
                log::trace!("dev {dev} queue {q}: fetch aborted");
                self.aborted = true;
            }
            r if r >= 0 || r == -libc::ENOBUFS => self.fetches_wanted += 1,
            err => log::error!(
                "dev {dev} queue {q}: FETCH_IO_CMDS failed: {}",
                io::Error::from_raw_os_error(-err)
            ),
        }
    }

    fn committed(&mut self, idx: usize, res: i32) {
        let (dev, q) = (self.dev_id, self.qid);
        self.committing = false;
        let n = self.arrays[idx].len;
        let first_left = uncommitted_from(res, n, self.arrays[idx].fmt.bytes);
        if res < 0 && n > 0 {
            log::error!(
                "dev {dev} queue {q} tag {}: the driver refused its commit: {}; dropping it",
                self.arrays[idx].tag(0),
                io::Error::from_raw_os_error(-res)
            );
        } else if first_left < n {
            log::debug!(
                "dev {dev} queue {q}: partial commit ({first_left} of {n}); committing the rest again"
            );
        }
        let filling = self.filling;
        for i in first_left.min(n)..n {
            let e = self.arrays[idx].get(i);
            if !self.arrays[filling].push(&e) {
                log::error!(
                    "dev {dev} queue {q} tag {}: commit array full; the request is lost",
                    self.arrays[idx].tag(i)
                );
            }
        }
        self.arrays[idx].len = 0;
    }

    pub fn describe(&self) -> String {
        format!(
            "batch: fetches armed {} wanted {} aborted {}, fetch buffers to give back {}, \
             committing {} (array {} holds {}, the other {}), unregistrations {} ({} to post)",
            self.fetches_armed,
            self.fetches_wanted,
            self.aborted,
            self.to_provide.len(),
            self.committing,
            self.filling,
            self.arrays[self.filling].len,
            self.arrays[1 - self.filling].len,
            self.unregs,
            self.unreg_to_push.len()
        )
    }

    /// Before the queue's thread ends with fetch commands still armed (`del` lets the
    /// device go quiet first, a hand-over leaves them on purpose): takes every fetch
    /// buffer the driver has not used back from the ring (REMOVE_BUFFERS) and waits for
    /// that. A request dispatched after the thread is gone then finds no buffer: the
    /// driver puts its tags back (ENOBUFS) and ends the fetch command, instead of
    /// copying the tags to a buffer's address from a kernel worker, in whatever address
    /// space that worker has (traced on 7.3; docs/research/issue-12-speed.md 14).
    /// Completions that arrive meanwhile are dropped, as the thread's exit would.
    pub fn withdraw_buffers(&mut self, ring: &mut IoUring) {
        if self.aborted || self.fetches_armed == 0 {
            return;
        }
        let ud = encode(Kind::FetchBuf, 0, 1);
        let remove = opcode::RemoveBuffers::new(self.nbufs, FETCH_GROUP)
            .build()
            .user_data(ud);
        // SAFETY: the command carries no pointer.
        if !unsafe { push_all(ring, &[remove]) } {
            log::warn!(
                "dev {} queue {}: cannot take the fetch buffers back: the ring is full",
                self.dev_id,
                self.qid
            );
            return;
        }
        if let Err(e) = wait_for(ring, ud) {
            log::warn!(
                "dev {} queue {}: taking the fetch buffers back: {e}",
                self.dev_id,
                self.qid
            );
        }
    }

    /// The fetch buffers and the two commit arrays, as (address, length).
    pub fn regions(&self) -> Vec<(*mut u8, usize)> {
        vec![
            self.fetch_mem.region(),
            self.arrays[0].region(),
            self.arrays[1].region(),
        ]
    }

    /// Nothing is waiting to be committed.
    pub fn idle(&self) -> bool {
        !self.committing && self.arrays[self.filling].len == 0 && self.unregs == 0
    }

    /// The driver may still deliver requests.
    pub fn armed(&self) -> bool {
        !self.aborted && self.fetches_armed + self.fetches_wanted > 0
    }
}

/// Submits and waits until the completion with `user_data` arrives; returns its
/// result. Other completions reaped meanwhile are dropped (at start and at the end of
/// the queue, nothing else is outstanding that the loop would miss).
fn wait_for(ring: &mut IoUring, user_data: u64) -> io::Result<i32> {
    loop {
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => return Err(e),
        }
        if let Some(res) = ring
            .completion()
            .find_map(|c| (c.user_data() == user_data).then_some(c.result()))
        {
            return Ok(res);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use io_uring::types;
    use std::os::fd::AsRawFd;

    /// Taking the fetch buffers back empties their group: a receive that selects from
    /// it then finds none (ENOBUFS), which is what the driver gets at a late dispatch.
    #[test]
    fn withdrawn_fetch_buffers_cannot_be_selected() {
        let mut ring = IoUring::new(16).unwrap();
        let mut batch = Batch::new(0, 0, 8, BufferMode::AutoZc, Vec::new()).unwrap();
        // SAFETY: the buffers live in `batch`, which outlives the ring's use of them.
        assert!(unsafe { push_all(&mut ring, &[batch.provide_all()]) });
        ring.submit().unwrap();

        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let select = |ring: &mut IoUring| {
            use std::io::Write;
            (&a).write_all(b"tags").unwrap();
            let recv = opcode::Recv::new(types::Fd(b.as_raw_fd()), std::ptr::null_mut(), 4)
                .buf_group(FETCH_GROUP)
                .build()
                .flags(squeue::Flags::BUFFER_SELECT)
                .user_data(2);
            // SAFETY: the receive writes into a buffer of the group, inside `batch`.
            assert!(unsafe { push_all(ring, &[recv]) });
            ring.submit_and_wait(1).unwrap();
            ring.completion().next().unwrap().result()
        };
        assert_eq!(select(&mut ring), 4, "a provided buffer is selected");

        batch.fetches_armed = FETCH_CMDS;
        batch.withdraw_buffers(&mut ring);
        assert_eq!(select(&mut ring), -libc::ENOBUFS);
    }
}
