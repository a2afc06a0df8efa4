//! The one user_data encoding of a queue's io_uring.
//!
//! Every SQE a queue submits carries a user_data built by [`encode`], and every CQE is
//! read back with [`decode`]:
//!
//! | bits   | field                                                          |
//! |--------|----------------------------------------------------------------|
//! | 0..16  | tag of the ublk request                                        |
//! | 16..32 | step: the target's label for its SQE (0 for the queue's own)   |
//! | 32..56 | zero                                                           |
//! | 56..64 | [`Kind`]                                                       |
//!
//! Kind 0 is never used, so a zeroed user_data (a stray NOP, a kernel bug) decodes to
//! `None` instead of being mistaken for a request.

/// What an SQE was for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Per-tag mode: FETCH_REQ or COMMIT_AND_FETCH_REQ: its completion delivers the
    /// next request.
    Command = 1,
    /// An operation a target pushed for a request.
    Target = 2,
    /// The read on the queue's wake-up eventfd.
    Wake = 3,
    /// UBLK_U_IO_REGISTER_IO_BUF (zero copy); completes only on failure.
    RegBuf = 4,
    /// UBLK_U_IO_UNREGISTER_IO_BUF (zero copy); per-tag mode: completes only on
    /// failure; batch mode: always (the commit waits for it).
    UnregBuf = 5,
    /// An operation a target pushed for itself, not for one request (tag is 0).
    TargetEvent = 6,
    /// Batch mode: UBLK_U_IO_PREP_IO_CMDS (tag 0).
    BatchPrep = 7,
    /// Batch mode: a multishot UBLK_U_IO_FETCH_IO_CMDS; step = its slot, tag 0.
    BatchFetch = 8,
    /// Batch mode: UBLK_U_IO_COMMIT_IO_CMDS; step = its commit buffer, tag 0.
    BatchCommit = 9,
    /// Batch mode: PROVIDE_BUFFERS of fetch buffers (tag 0); completes only on failure.
    FetchBuf = 10,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserData {
    pub kind: Kind,
    pub tag: u16,
    pub step: u16,
}

const KIND_SHIFT: u32 = 56;
const STEP_SHIFT: u32 = 16;

pub fn encode(kind: Kind, tag: u16, step: u16) -> u64 {
    ((kind as u64) << KIND_SHIFT) | (u64::from(step) << STEP_SHIFT) | u64::from(tag)
}

pub fn decode(data: u64) -> Option<UserData> {
    let kind = match (data >> KIND_SHIFT) as u8 {
        1 => Kind::Command,
        2 => Kind::Target,
        3 => Kind::Wake,
        4 => Kind::RegBuf,
        5 => Kind::UnregBuf,
        6 => Kind::TargetEvent,
        7 => Kind::BatchPrep,
        8 => Kind::BatchFetch,
        9 => Kind::BatchCommit,
        10 => Kind::FetchBuf,
        _ => return None,
    };
    if data & 0x00ff_ffff_0000_0000 != 0 {
        return None;
    }
    Some(UserData {
        kind,
        tag: data as u16,
        step: (data >> STEP_SHIFT) as u16,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for kind in [
            Kind::Command,
            Kind::Target,
            Kind::Wake,
            Kind::RegBuf,
            Kind::UnregBuf,
            Kind::TargetEvent,
            Kind::BatchPrep,
            Kind::BatchFetch,
            Kind::BatchCommit,
            Kind::FetchBuf,
        ] {
            for tag in [0u16, 1, 127, 4095, u16::MAX] {
                for step in [0u16, 1, 0x1234, u16::MAX] {
                    let d = encode(kind, tag, step);
                    assert_eq!(decode(d), Some(UserData { kind, tag, step }));
                }
            }
        }
    }

    #[test]
    fn rejects_foreign_values() {
        assert_eq!(decode(0), None);
        assert_eq!(decode(u64::MAX), None);
        assert_eq!(decode(0x7f << 56), None);
        assert_eq!(decode(encode(Kind::Target, 1, 2) | (1 << 40)), None);
    }
}
