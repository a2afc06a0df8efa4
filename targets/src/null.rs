//! The `null` target: every request succeeds at once; reads leave the buffer untouched.

use crate::{DeviceShape, IoBuf, IoDesc, Outcome, QueueContext, QueueTarget, Ring, Target};

pub struct NullTarget {
    size: u64,
}

impl NullTarget {
    pub fn new(size: u64) -> Self {
        NullTarget { size }
    }
}

impl Target for NullTarget {
    fn name(&self) -> &'static str {
        "null"
    }

    fn shape(&self) -> DeviceShape {
        DeviceShape {
            size: self.size,
            read_only: false,
            volatile_cache: false,
            fua: false,
            rotational: false,
            discard: true,
            write_zeroes: true,
        }
    }

    fn details(&self) -> Vec<(String, String)> {
        Vec::new()
    }

    /// Any size: a null device stores nothing.
    fn resize(&self, _current: u64, requested: Option<u64>, _grow: bool) -> Result<u64, String> {
        requested.ok_or_else(|| "a null device needs the new size (ublkctl resize ID SIZE)".into())
    }

    fn queue(&self, _ctx: QueueContext) -> std::io::Result<Box<dyn QueueTarget>> {
        Ok(Box::new(NullQueue))
    }
}

struct NullQueue;

fn done(io: &IoDesc) -> Outcome {
    // len is at most the device's max IO size (512 KiB), far below i32::MAX.
    Outcome::Done(io.len as i32)
}

impl QueueTarget for NullQueue {
    fn read(&mut self, io: &IoDesc, _: IoBuf, _: &mut dyn Ring) -> Outcome {
        done(io)
    }
    fn write(&mut self, io: &IoDesc, _: IoBuf, _: &mut dyn Ring) -> Outcome {
        done(io)
    }
    fn flush(&mut self, _: &IoDesc, _: &mut dyn Ring) -> Outcome {
        Outcome::Done(0)
    }
    fn discard(&mut self, _: &IoDesc, _: &mut dyn Ring) -> Outcome {
        Outcome::Done(0)
    }
    fn write_zeroes(&mut self, _: &IoDesc, _: &mut dyn Ring) -> Outcome {
        Outcome::Done(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{dispatch, BlockOp, IoFlags, RingFull};
    use io_uring::squeue;

    struct PanicRing;
    impl Ring for PanicRing {
        unsafe fn push(&mut self, _: u16, _: u16, _: squeue::Entry) -> Result<(), RingFull> {
            unreachable!("the null target never submits IO")
        }
        unsafe fn push_event(&mut self, _: u16, _: squeue::Entry) -> Result<(), RingFull> {
            unreachable!("the null target never submits IO")
        }
        fn finish(&mut self, _: u16, _: i32) {
            unreachable!("the null target completes through Outcome")
        }
    }

    #[test]
    fn everything_completes_at_once() {
        let t = NullTarget::new(1 << 20);
        assert!(t.shape().discard && t.shape().write_zeroes);
        let mut q = t
            .queue(QueueContext {
                qid: 0,
                depth: 1,
                first_file: 1,
                user_copy: false,
                staging_index: None,
                own_pages: false,
                max_io_bytes: 512 << 10,
            })
            .unwrap();
        for (op, expect) in [
            (BlockOp::Read, 4096),
            (BlockOp::Write, 4096),
            (BlockOp::Flush, 0),
            (BlockOp::Discard, 0),
            (BlockOp::WriteZeroes, 0),
        ] {
            let io = IoDesc {
                tag: 0,
                op,
                flags: IoFlags::default(),
                offset: 0,
                len: 4096,
            };
            assert_eq!(
                dispatch(q.as_mut(), &io, IoBuf::None, &mut PanicRing),
                Outcome::Done(expect)
            );
        }
    }
}
