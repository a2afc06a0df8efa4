//! Per-queue counters, written by the queue thread and read by `ublkctl show`.

use std::sync::atomic::{AtomicI32, AtomicU64, Ordering::Relaxed};
use std::sync::OnceLock;
use ublkd_proto::QueueStats;
use ublkd_targets::{BlockOp, IoDesc};

#[derive(Debug, Default)]
pub struct QueueCounters {
    tid: AtomicI32,
    /// The CPU list the thread is pinned to (empty: not pinned).
    cpus: OnceLock<String>,
    requests: AtomicU64,
    reads: AtomicU64,
    writes: AtomicU64,
    flushes: AtomicU64,
    discards: AtomicU64,
    write_zeroes: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    errors: AtomicU64,
    inflight: AtomicU64,
}

impl QueueCounters {
    pub fn set_tid(&self, tid: i32) {
        self.tid.store(tid, Relaxed);
    }

    pub fn set_cpus(&self, cpus: String) {
        let _ = self.cpus.set(cpus);
    }

    /// A request arrived from the driver.
    pub fn started(&self, io: &IoDesc) {
        self.requests.fetch_add(1, Relaxed);
        self.inflight.fetch_add(1, Relaxed);
        let counter = match io.op {
            BlockOp::Read => &self.reads,
            BlockOp::Write => &self.writes,
            BlockOp::Flush => &self.flushes,
            BlockOp::Discard => &self.discards,
            BlockOp::WriteZeroes => &self.write_zeroes,
            BlockOp::Other(_) => return,
        };
        counter.fetch_add(1, Relaxed);
    }

    /// A request was committed back with `result` (bytes or -errno).
    pub fn finished(&self, io: &IoDesc, result: i32) {
        self.inflight.fetch_sub(1, Relaxed);
        if result < 0 {
            self.errors.fetch_add(1, Relaxed);
            return;
        }
        let bytes = result as u64;
        match io.op {
            BlockOp::Read => self.bytes_read.fetch_add(bytes, Relaxed),
            BlockOp::Write => self.bytes_written.fetch_add(bytes, Relaxed),
            _ => 0,
        };
    }

    /// Requests committed back so far.
    pub fn completed(&self) -> u64 {
        self.requests
            .load(Relaxed)
            .saturating_sub(self.inflight.load(Relaxed))
    }

    pub fn snapshot(&self, queue: u32) -> QueueStats {
        QueueStats {
            queue,
            tid: self.tid.load(Relaxed),
            cpus: self.cpus.get().cloned().unwrap_or_default(),
            requests: self.requests.load(Relaxed),
            reads: self.reads.load(Relaxed),
            writes: self.writes.load(Relaxed),
            flushes: self.flushes.load(Relaxed),
            discards: self.discards.load(Relaxed),
            write_zeroes: self.write_zeroes.load(Relaxed),
            bytes_read: self.bytes_read.load(Relaxed),
            bytes_written: self.bytes_written.load(Relaxed),
            errors: self.errors.load(Relaxed),
            inflight: self.inflight.load(Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ublkd_targets::IoFlags;

    #[test]
    fn counts_ops_bytes_and_errors() {
        let c = QueueCounters::default();
        let rd = IoDesc {
            tag: 0,
            op: BlockOp::Read,
            flags: IoFlags::default(),
            offset: 0,
            len: 4096,
        };
        let wr = IoDesc {
            op: BlockOp::Write,
            ..rd
        };
        c.started(&rd);
        c.started(&wr);
        assert_eq!(c.snapshot(0).inflight, 2);
        c.finished(&rd, 4096);
        c.finished(&wr, -libc::EIO);
        let s = c.snapshot(3);
        assert_eq!((s.queue, s.requests, s.reads, s.writes), (3, 2, 1, 1));
        assert_eq!(
            (s.bytes_read, s.bytes_written, s.errors, s.inflight),
            (4096, 0, 1, 0)
        );
    }
}
