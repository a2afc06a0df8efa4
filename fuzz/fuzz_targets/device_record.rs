//! A device record file (`<state>/devices/<id>.json`) as the daemon reads it at start:
//! the fuzz input is written as record 7 and the daemon's own `StateDir::load` reads it
//! (daemon/src/state.rs is compiled in here, since the daemon is a binary crate). A
//! record that loads must be the device it is filed under, and must save and load again
//! unchanged.
#![no_main]

#[allow(dead_code)]
#[path = "../../daemon/src/state.rs"]
mod state;

use libfuzzer_sys::fuzz_target;
use state::StateDir;
use std::sync::OnceLock;

const ID: u32 = 7;

fn state_dir() -> &'static StateDir {
    static DIR: OnceLock<StateDir> = OnceLock::new();
    DIR.get_or_init(|| {
        // scripts/fuzz.sh points TMPDIR at its scratch directory and removes it.
        let dir = std::env::temp_dir().join(format!("ublkd-fuzz-state-{}", std::process::id()));
        StateDir::open(&dir).expect("cannot create the fuzz state directory")
    })
}

fuzz_target!(|data: &[u8]| {
    let state = state_dir();
    let path = state.path(ID);
    std::fs::write(&path, data).expect("cannot write the record file");
    let (good, bad) = state.load().expect("the state directory is readable");
    assert_eq!(good.len() + bad.len(), 1, "{good:?} {bad:?}");
    if let Some(record) = good.first() {
        assert_eq!(record.id, ID);
        assert_eq!(
            record.add.id,
            Some(ID),
            "record {ID} would be restored as device {:?}",
            record.add.id
        );
        state.save(record).expect("cannot save the record");
        let (again, bad) = state.load().expect("the state directory is readable");
        assert!(bad.is_empty(), "{bad:?}");
        assert_eq!(again.first(), Some(record));
    } else {
        assert_eq!(bad[0].id, Some(ID));
        assert!(!bad[0].error.is_empty());
    }
    let _ = std::fs::remove_file(&path);
});
