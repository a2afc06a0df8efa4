//! Device records: what `ublkctl add` asked for, kept in the state directory so that a
//! restarted daemon (after a crash, an upgrade or a reboot) serves the same devices under
//! the same ids.
//!
//! One JSON file per device, `devices/<id>.json`, written atomically: a temporary file in
//! the same directory, fsync, rename over the old record, fsync of the directory. A
//! reader therefore sees the old record or the new one, never a mix, even after a power
//! loss. A record that cannot be read (truncated, corrupt, from a newer ublkd) is
//! reported with its path and the reason and left in place for the administrator.

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use ublkd_proto::{AddDevice, BackingId, BufferMode};

/// Format version of the record files this build writes and reads.
const VERSION: u32 = 1;

/// What the daemon needs to serve a device again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    pub version: u32,
    pub id: u32,
    /// The add request as the user gave it (its `id` set to the device's).
    pub add: AddDevice,
    /// The buffer mode the device was created with. Recovery must use it: the
    /// zero-copy modes are fixed in the kernel's device when it is added.
    pub buffer: BufferMode,
    /// What a loop device's backing path named when the device was added: a restore
    /// refuses to serve another file that has taken its place. Records written before
    /// ublkd kept it have none; they are restored unchecked and get it on their next
    /// save.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing: Option<BackingId>,
    /// `del` has begun: the record is marked before the device is stopped, so a daemon
    /// that dies half-way through is followed by one that finishes the delete instead of
    /// bringing the device back.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleting: bool,
}

impl Record {
    pub fn new(id: u32, add: &AddDevice, buffer: BufferMode) -> Record {
        Record {
            version: VERSION,
            id,
            add: AddDevice {
                id: Some(id),
                ..add.clone()
            },
            buffer,
            backing: None,
            deleting: false,
        }
    }
}

/// A record file that could not be used, and why.
#[derive(Debug)]
pub struct BadRecord {
    pub path: PathBuf,
    /// The device id, when the file name tells it.
    pub id: Option<u32>,
    pub error: String,
}

/// The directory of device records.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    /// Opens (creating it if needed, mode 0700) `<state_dir>/devices`.
    pub fn open(state_dir: &Path) -> Result<StateDir> {
        let dir = state_dir.join("devices");
        fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create the state directory {}", dir.display()))?;
        Ok(StateDir { dir })
    }

    pub fn path(&self, id: u32) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// Where device `id` notes what it has quiesced while a snapshot is taken
    /// (`<state_dir>/quiesced/ID`), so that the next ublkd undoes it after a crash.
    pub fn quiesce_marker(&self, id: u32) -> PathBuf {
        let parent = self.dir.parent().unwrap_or(&self.dir);
        parent.join("quiesced").join(id.to_string())
    }

    /// Writes the record of `record.id` atomically, replacing any older one.
    pub fn save(&self, record: &Record) -> Result<()> {
        let path = self.path(record.id);
        let tmp = self.dir.join(format!(".{}.json.tmp", record.id));
        let mut text = serde_json::to_string_pretty(record)?;
        text.push('\n');
        let write = || -> std::io::Result<()> {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            fs::rename(&tmp, &path)?;
            File::open(&self.dir)?.sync_all()
        };
        write().map_err(|e| {
            let _ = fs::remove_file(&tmp);
            anyhow!("cannot write the device record {}: {e}", path.display())
        })
    }

    /// Removes the record of `id`, if there is one, and its quiesce marker: a device
    /// that is gone has nothing left to thaw, and a later device of the same id must
    /// not undo what the marker lists.
    pub fn remove(&self, id: u32) -> Result<()> {
        let _ = fs::remove_file(self.quiesce_marker(id));
        let path = self.path(id);
        match fs::remove_file(&path) {
            Ok(()) => File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .with_context(|| format!("cannot sync {}", self.dir.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(anyhow!("cannot remove {}: {e}", path.display())),
        }
    }

    /// Reads every record, in id order. Files that cannot be used come back separately;
    /// they never stop the others from loading.
    pub fn load(&self) -> Result<(Vec<Record>, Vec<BadRecord>)> {
        let entries = fs::read_dir(&self.dir)
            .with_context(|| format!("cannot read {}", self.dir.display()))?;
        let mut good = Vec::new();
        let mut bad = Vec::new();
        for entry in entries {
            let entry = entry.with_context(|| format!("cannot read {}", self.dir.display()))?;
            let path = entry.path();
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') && name.ends_with(".tmp") {
                // A write that never reached its rename: the old record (if any) stands.
                let _ = fs::remove_file(&path);
                continue;
            }
            // Only canonical names are records: "7.json", not "07.json" or "+7.json",
            // so that one id never has two files.
            let Some(id) = record_id(&name) else {
                bad.push(BadRecord {
                    path,
                    id: None,
                    error: "not a device record (records are named ID.json); \
                            move it out of the records folder"
                        .into(),
                });
                continue;
            };
            match read_record(&path, Some(id)) {
                Ok(r) => good.push(r),
                Err(e) => bad.push(BadRecord {
                    path,
                    id: Some(id),
                    error: format!("{e:#}"),
                }),
            }
        }
        good.sort_by_key(|r| r.id);
        bad.sort_by(|a, b| a.path.cmp(&b.path));
        Ok((good, bad))
    }
}

/// The device id of a record file name, if it is a canonical `ID.json`.
fn record_id(name: &str) -> Option<u32> {
    let stem = name.strip_suffix(".json")?;
    let id = stem.parse::<u32>().ok()?;
    (id.to_string() == stem).then_some(id)
}

fn read_record(path: &Path, id: Option<u32>) -> Result<Record> {
    let text = fs::read_to_string(path).context("cannot read it")?;
    if text.trim().is_empty() {
        bail!("the file is empty");
    }
    // Check the version first, so a record from a newer ublkd says so instead of
    // failing on a field this build does not know.
    let value: serde_json::Value =
        serde_json::from_str(&text).context("not valid JSON (truncated or corrupt)")?;
    match value.get("version").and_then(|v| v.as_u64()) {
        Some(v) if v == u64::from(VERSION) => {}
        Some(v) => bail!("record format version {v}; this ublkd reads version {VERSION}"),
        None => bail!("no record format version"),
    }
    let record: Record = serde_json::from_value(value).context("not a device record")?;
    if id != Some(record.id) {
        bail!(
            "the file name does not match the device id {} inside",
            record.id
        );
    }
    // Recovery adds the device with the add request's id (found by fuzzing).
    if record.add.id != Some(record.id) {
        let asked = record
            .add
            .id
            .map_or("any device".into(), |i| format!("device {i}"));
        bail!("its add request is for {asked}, not device {}", record.id);
    }
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ublkd_proto::TargetSpec;

    fn add() -> AddDevice {
        AddDevice {
            target: TargetSpec::Loop {
                file: "/srv/disk.img".into(),
                direct_io: Default::default(),
                read_only: false,
            },
            id: None,
            name: Some("db".into()),
            queues: Some(2),
            depth: None,
            block_size: None,
            buffer: None,
            batch: Some(false),
            affinity: None,
        }
    }

    #[test]
    fn save_load_remove() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::open(tmp.path()).unwrap();
        assert_eq!(state.load().unwrap().0, vec![]);
        let r3 = Record::new(3, &add(), BufferMode::AutoZc);
        let r1 = Record::new(1, &add(), BufferMode::Copy);
        state.save(&r3).unwrap();
        state.save(&r1).unwrap();
        assert_eq!(r3.add.id, Some(3));
        let (good, bad) = state.load().unwrap();
        assert!(bad.is_empty(), "{bad:?}");
        assert_eq!(good, vec![r1.clone(), r3.clone()]);

        // Saving again replaces the record; no temporary file stays behind.
        let r3b = Record::new(3, &add(), BufferMode::Zc);
        state.save(&r3b).unwrap();
        assert_eq!(state.load().unwrap().0, vec![r1.clone(), r3b]);
        let names: Vec<_> = fs::read_dir(tmp.path().join("devices"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");

        // A quiesce marker (outside the records' folder) goes with its record.
        let marker = state.quiesce_marker(3);
        assert_eq!(marker, tmp.path().join("quiesced/3"));
        fs::create_dir_all(marker.parent().unwrap()).unwrap();
        fs::write(&marker, "{}").unwrap();
        state.remove(3).unwrap();
        state.remove(3).unwrap();
        assert!(!marker.exists());
        assert_eq!(state.load().unwrap().0, vec![r1]);
    }

    #[test]
    fn bad_records_are_reported_and_do_not_stop_the_others() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::open(tmp.path()).unwrap();
        let good = Record::new(0, &add(), BufferMode::AutoZc);
        state.save(&good).unwrap();
        let full = fs::read_to_string(state.path(0)).unwrap();
        let dir = tmp.path().join("devices");
        fs::write(dir.join("1.json"), &full[..full.len() / 2]).unwrap();
        fs::write(dir.join("2.json"), "").unwrap();
        fs::write(dir.join("3.json"), b"\x00\xff garbage").unwrap();
        fs::write(
            dir.join("4.json"),
            full.replace("\"version\": 1", "\"version\": 9"),
        )
        .unwrap();
        fs::write(dir.join("5.json"), &full).unwrap(); // says id 0 inside
        fs::write(dir.join("6.json"), r#"{"version":1,"id":6}"#).unwrap();
        fs::write(dir.join(".7.json.tmp"), "half a wri").unwrap();
        // Names that are not canonical ID.json never become an id.
        for odd in ["notes.txt", "07.json", "+8.json", "9.json.bak"] {
            fs::write(dir.join(odd), &full).unwrap();
        }

        let (records, bad) = state.load().unwrap();
        assert_eq!(records, vec![good]);
        let (named, odd): (Vec<_>, Vec<_>) = bad.iter().partition(|b| b.id.is_some());
        let got: Vec<(Option<u32>, &str)> =
            named.iter().map(|b| (b.id, b.error.as_str())).collect();
        assert_eq!(got.len(), 6, "{got:?}");
        let expect = [
            (1, "truncated or corrupt"),
            (2, "the file is empty"),
            (3, "cannot read it"),
            (4, "record format version 9"),
            (5, "does not match the device id 0"),
            (6, "not a device record"),
        ];
        for ((id, err), (want_id, want)) in got.iter().zip(expect) {
            assert_eq!(*id, Some(want_id));
            assert!(err.contains(want), "record {want_id}: {err}");
        }
        let odd: Vec<String> = odd
            .iter()
            .map(|b| {
                assert!(b.error.contains("records are named ID.json"), "{b:?}");
                b.path.file_name().unwrap().to_string_lossy().into_owned()
            })
            .collect();
        assert_eq!(odd, ["+8.json", "07.json", "9.json.bak", "notes.txt"]);
        assert!(!dir.join(".7.json.tmp").exists(), "stale temp file removed");
    }

    /// Found by fuzz/fuzz_targets/device_record.rs: record 7 whose add request said
    /// device 6 loaded, and recovery would have created device 6 for entry 7.
    #[test]
    fn the_add_request_must_be_for_the_same_device() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::open(tmp.path()).unwrap();
        let mut r = Record::new(7, &add(), BufferMode::Copy);
        for other in [Some(6), None] {
            r.add.id = other;
            state.save(&r).unwrap();
            let (good, bad) = state.load().unwrap();
            assert!(good.is_empty(), "{good:?}");
            assert!(bad[0].error.contains("add request is for"), "{bad:?}");
        }
    }

    #[test]
    fn a_delete_mark_survives_a_reload() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::open(tmp.path()).unwrap();
        let mut r = Record::new(4, &add(), BufferMode::AutoZc);
        state.save(&r).unwrap();
        let text = fs::read_to_string(state.path(4)).unwrap();
        assert!(
            !text.contains("deleting"),
            "unmarked records stay as before: {text}"
        );
        r.deleting = true;
        state.save(&r).unwrap();
        assert_eq!(state.load().unwrap().0, vec![r]);
    }

    #[test]
    fn an_unwritable_directory_is_a_clear_error() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::open(tmp.path()).unwrap();
        fs::remove_dir(tmp.path().join("devices")).unwrap();
        let e = state
            .save(&Record::new(0, &add(), BufferMode::Copy))
            .unwrap_err();
        assert!(
            e.to_string().contains("cannot write the device record"),
            "{e}"
        );
    }
}
