use super::*;
use crate::test_ring::{decode, TestRing};
use crate::{dispatch, BlockOp, IoFlags};
use crate::{Completion, IoBuf, IoDesc, Outcome, Owner, QueueTarget};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ublkd-loop-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("backing")
}

fn opts(path: &Path) -> LoopOptions {
    LoopOptions {
        path: path.into(),
        direct_io: DirectIo::Auto,
        read_only: false,
        block_size: 512,
    }
}

#[test]
fn bad_backing_files_are_refused_clearly() {
    let missing = tmp("missing").with_file_name("nope");
    let e = LoopTarget::open(&opts(&missing)).err().unwrap();
    assert!(e.to_string().contains("does not exist"), "{e}");

    let dir = tmp("dir");
    let e = LoopTarget::open(&opts(dir.parent().unwrap()))
        .err()
        .unwrap();
    assert!(e.to_string().contains("is a directory"), "{e}");

    let empty = tmp("empty");
    File::create(&empty).unwrap();
    let e = LoopTarget::open(&opts(&empty)).err().unwrap();
    assert!(e.to_string().contains("is empty"), "{e}");

    let odd = tmp("odd");
    File::create(&odd).unwrap().set_len(1000).unwrap();
    let e = LoopTarget::open(&opts(&odd)).err().unwrap();
    assert!(
        e.to_string()
            .contains("not a multiple of the block size 512"),
        "{e}"
    );
    let e = LoopTarget::open(&LoopOptions {
        block_size: 4096,
        ..opts(&odd)
    })
    .err()
    .unwrap();
    assert!(e.to_string().contains("block size 4096"), "{e}");

    let e = LoopTarget::open(&opts(Path::new("/dev/null")))
        .err()
        .unwrap();
    assert_eq!(
        e.to_string(),
        "/dev/null is a character device, not a regular file or block device"
    );
}

#[test]
fn fifos_and_sockets_are_refused_without_blocking() {
    let fifo = tmp("fifo");
    let _ = std::fs::remove_file(&fifo);
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    // A plain open of a FIFO with no writer would block here forever.
    let e = LoopTarget::open(&opts(&fifo)).err().unwrap();
    assert_eq!(
        e.to_string(),
        format!(
            "{} is a FIFO, not a regular file or block device",
            fifo.display()
        )
    );
    let e = LoopTarget::open(&LoopOptions {
        read_only: true,
        ..opts(&fifo)
    })
    .err()
    .unwrap();
    assert!(e.to_string().contains("is a FIFO"), "{e}");

    let sock = tmp("sock");
    let _ = std::fs::remove_file(&sock);
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let e = LoopTarget::open(&opts(&sock)).err().unwrap();
    assert_eq!(
        e.to_string(),
        format!(
            "{} is a socket, not a regular file or block device",
            sock.display()
        )
    );
}

#[test]
fn a_loop_device_grows_with_its_file_and_never_shrinks() {
    let path = tmp("resize");
    File::create(&path).unwrap().set_len(1 << 20).unwrap();
    let t = LoopTarget::open(&opts(&path)).unwrap();
    let mib = 1u64 << 20;
    // Nothing changed: the same size.
    assert_eq!(t.resize(mib, None, false), Ok(mib));
    // The file grew: the device follows it.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(2 * mib)
        .unwrap();
    assert_eq!(t.resize(mib, None, false), Ok(2 * mib));
    // Asked for more than the file has: only with --grow-file, which grows it.
    let err = t.resize(2 * mib, Some(4 * mib), false).unwrap_err();
    assert!(err.contains("--grow-file"), "{err}");
    assert_eq!(t.resize(2 * mib, Some(4 * mib), true), Ok(4 * mib));
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 4 * mib);
    // Less than the device or the file: refused, and the file is left alone.
    let err = t.resize(4 * mib, Some(mib), true).unwrap_err();
    assert!(err.contains("does not shrink"), "{err}");
    let err = t.resize(2 * mib, Some(3 * mib), true).unwrap_err();
    assert!(err.contains("whole size"), "{err}");
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 4 * mib);
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn a_regular_file_is_served_and_known_by_its_inode() {
    let path = tmp("identity");
    File::create(&path).unwrap().set_len(1 << 20).unwrap();
    let t = LoopTarget::open(&opts(&path)).unwrap();
    assert_eq!(t.shape().size, 1 << 20);
    let id = t.backing_id().unwrap();
    let meta = std::fs::metadata(&path).unwrap();
    match id {
        BackingId::File { dev, ino, .. } => {
            assert_eq!((dev, ino), (meta.dev(), meta.ino()));
        }
        other => panic!("a file has a file identity, got {other:?}"),
    }
    // Reopened: the same file.
    let again = LoopTarget::open(&opts(&path)).unwrap();
    assert!(id.same_as(&again.backing_id().unwrap()));
    // Replaced by another file at the same path: another identity, even where the
    // file system reuses the inode number (the generation differs then).
    drop((t, again));
    std::fs::remove_file(&path).unwrap();
    File::create(&path).unwrap().set_len(1 << 20).unwrap();
    let other = LoopTarget::open(&opts(&path)).unwrap();
    assert!(!id.same_as(&other.backing_id().unwrap()), "{id:?}");
}

/// Runs one request through a real io_uring against a real file.
fn run(q: &mut dyn QueueTarget, ring: &mut TestRing, io: &IoDesc, buf: IoBuf) -> i32 {
    let mut out = dispatch(q, io, buf, ring);
    loop {
        match out {
            Outcome::Done(r) => {
                assert!(
                    ring.finished.is_empty(),
                    "the loop target finishes by Outcome"
                );
                return r;
            }
            Outcome::Busy => panic!("ring full in test"),
            Outcome::Queued => {
                ring.ring.submit_and_wait(1).unwrap();
                let cqe = ring.ring.completion().next().unwrap();
                let (event, step, _) = decode(cqe.user_data());
                assert!(!event, "the loop target has no target-wide SQEs");
                let done = Completion {
                    owner: Owner::Request(*io, buf),
                    step,
                    res: cqe.result(),
                };
                out = q.complete(done, ring);
            }
        }
    }
}

#[test]
fn reads_writes_flushes_and_punches_a_file() {
    let path = tmp("rw");
    let mut f = File::create(&path).unwrap();
    f.write_all(&vec![0xab; 1 << 20]).unwrap();
    drop(f);
    let t = LoopTarget::open(&LoopOptions {
        direct_io: DirectIo::Off,
        ..opts(&path)
    })
    .unwrap();
    assert_eq!(t.shape().size, 1 << 20);
    let mut ring = TestRing::new(8);
    ring.ring.submitter().register_files(&t.files()).unwrap();
    let mut q = t
        .queue(QueueContext {
            qid: 0,
            depth: 4,
            first_file: 0,
            user_copy: false,
            staging_index: None,
            own_pages: false,
            max_io_bytes: 512 << 10,
        })
        .unwrap();

    let mut data = vec![0x5au8; 8192];
    let buf = IoBuf::User {
        addr: data.as_mut_ptr(),
        len: 8192,
    };
    let wr = IoDesc {
        tag: 1,
        op: BlockOp::Write,
        flags: IoFlags {
            fua: true,
            no_unmap: false,
        },
        offset: 4096,
        len: 8192,
    };
    assert_eq!(run(q.as_mut(), &mut ring, &wr, buf), 8192);
    let flush = IoDesc {
        op: BlockOp::Flush,
        len: 0,
        offset: 0,
        ..wr
    };
    assert_eq!(run(q.as_mut(), &mut ring, &flush, IoBuf::None), 0);

    let mut back = vec![0u8; 16384];
    let rbuf = IoBuf::User {
        addr: back.as_mut_ptr(),
        len: 16384,
    };
    let rd = IoDesc {
        tag: 2,
        op: BlockOp::Read,
        flags: IoFlags::default(),
        offset: 0,
        len: 16384,
    };
    assert_eq!(run(q.as_mut(), &mut ring, &rd, rbuf), 16384);
    assert!(back[..4096].iter().all(|&b| b == 0xab));
    assert!(back[4096..12288].iter().all(|&b| b == 0x5a));
    assert!(back[12288..].iter().all(|&b| b == 0xab));

    if t.shape().discard {
        let d = IoDesc {
            tag: 3,
            op: BlockOp::Discard,
            flags: IoFlags::default(),
            offset: 0,
            len: 65536,
        };
        assert_eq!(run(q.as_mut(), &mut ring, &d, IoBuf::None), 0);
        assert_eq!(run(q.as_mut(), &mut ring, &rd, rbuf), 16384);
        assert!(
            back.iter().all(|&b| b == 0),
            "discarded range reads back as zeroes"
        );
    }
    if t.shape().write_zeroes {
        let z = IoDesc {
            tag: 3,
            op: BlockOp::WriteZeroes,
            flags: IoFlags::default(),
            offset: 65536,
            len: 4096,
        };
        assert_eq!(run(q.as_mut(), &mut ring, &z, IoBuf::None), 0);
        let r = IoDesc {
            offset: 65536,
            len: 4096,
            ..rd
        };
        assert_eq!(
            run(
                q.as_mut(),
                &mut ring,
                &r,
                IoBuf::User {
                    addr: back.as_mut_ptr(),
                    len: 4096
                }
            ),
            4096
        );
        assert!(back[..4096].iter().all(|&b| b == 0));
    }
    std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
}

#[test]
fn read_only_targets_refuse_writes() {
    let path = tmp("ro");
    File::create(&path).unwrap().set_len(1 << 16).unwrap();
    let t = LoopTarget::open(&LoopOptions {
        read_only: true,
        ..opts(&path)
    })
    .unwrap();
    assert!(t.shape().read_only && !t.shape().discard);
    let mut ring = TestRing::new(8);
    let mut q = t
        .queue(QueueContext {
            qid: 0,
            depth: 1,
            first_file: 0,
            user_copy: false,
            staging_index: None,
            own_pages: false,
            max_io_bytes: 512 << 10,
        })
        .unwrap();
    let wr = IoDesc {
        tag: 0,
        op: BlockOp::Write,
        flags: IoFlags::default(),
        offset: 0,
        len: 512,
    };
    let mut data = [0u8; 512];
    let buf = IoBuf::User {
        addr: data.as_mut_ptr(),
        len: 512,
    };
    assert_eq!(run(q.as_mut(), &mut ring, &wr, buf), -libc::EROFS);
    std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
}
