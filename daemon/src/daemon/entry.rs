//! An entry of the device table: a served device, a recorded one that is not served
//! (and why), or one that a piece of work under way owns; and what `list`, `show` and
//! the refusals say about each.

use super::*;

pub(super) enum Entry {
    Live(Box<Device>),
    /// Recorded but not served. `record` is None when the record file is unreadable.
    Failed {
        record: Option<Record>,
        error: String,
    },
    /// Recorded, waiting for its turn in the restore at start.
    Restoring(Record),
    /// An `add` holds the id while the kernel creates the device.
    Adding(AddDevice),
    /// A `recover` is under way.
    Recovering(Record),
    /// A `del` is under way.
    Deleting(Option<Record>),
    /// A network device whose server has not answered yet: retried in the background
    /// (`Daemon::connect_in_background`) until it does or the device is deleted.
    Connecting {
        record: Record,
        error: String,
    },
}

impl Entry {
    pub(super) fn record(&self) -> Option<&Record> {
        match self {
            Entry::Live(d) => Some(&d.record),
            Entry::Failed { record, .. } | Entry::Deleting(record) => record.as_ref(),
            Entry::Restoring(r) | Entry::Recovering(r) => Some(r),
            Entry::Connecting { record, .. } => Some(record),
            Entry::Adding(_) => None,
        }
    }

    pub(super) fn add_request(&self) -> Option<&AddDevice> {
        match self {
            Entry::Adding(add) => Some(add),
            other => other.record().map(|r| &r.add),
        }
    }

    pub(super) fn name(&self) -> Option<&str> {
        self.add_request().and_then(|a| a.name.as_deref())
    }

    /// The work under way that owns the entry, if any.
    pub(super) fn busy(&self) -> Option<&'static str> {
        match self {
            Entry::Live(_) | Entry::Failed { .. } | Entry::Connecting { .. } => None,
            Entry::Restoring(_) => Some("restoring"),
            Entry::Adding(_) => Some("adding"),
            Entry::Recovering(_) => Some("recovering"),
            Entry::Deleting(_) => Some("deleting"),
        }
    }

    /// The entry's state in a word, as `list` shows it for entries not served.
    pub(super) fn state(&self) -> &'static str {
        match self {
            Entry::Live(_) => "live",
            Entry::Failed { .. } => "failed",
            Entry::Connecting { .. } => "connecting",
            other => other.busy().unwrap_or("unknown"),
        }
    }

    pub(super) fn info(&self, id: u32) -> DeviceInfo {
        let error = match self {
            Entry::Live(d) => return d.info(),
            Entry::Failed { error, .. } | Entry::Connecting { error, .. } => Some(error.clone()),
            _ => None,
        };
        let state = self.state();
        let add = self.add_request();
        DeviceInfo {
            id,
            target: add.map_or("?", |a| a.target.name()).to_string(),
            size: match add.map(|a| &a.target) {
                Some(ublkd_proto::TargetSpec::Null { size }) => *size,
                _ => 0,
            },
            block_size: add.and_then(|a| a.block_size).unwrap_or(DEFAULT_BLOCK_SIZE),
            queues: add.and_then(|a| a.queues).unwrap_or(DEFAULT_QUEUES),
            depth: add.and_then(|a| a.depth).unwrap_or(DEFAULT_DEPTH),
            buffer: self.record().map_or(
                add.and_then(|a| a.buffer).unwrap_or(BufferMode::Copy),
                |r| r.buffer,
            ),
            commands: None,
            affinity: add.map(|a| a.affinity()).unwrap_or_default(),
            state: state.to_string(),
            path: format!("/dev/ublkb{id}"),
            name: add.and_then(|a| a.name.clone()),
            error,
            spec: add.map(|a| a.target.clone()),
        }
    }

    /// `show` of the entry: in full when served, else what the record says and why
    /// it is not served.
    pub(super) fn detail(&self, id: u32) -> DeviceDetail {
        match self {
            Entry::Live(d) => d.detail(),
            other => DeviceDetail {
                info: other.info(id),
                char_path: format!("/dev/ublkc{id}"),
                target_details: Vec::new(),
                kernel: None,
                queue_stats: Vec::new(),
                target_counters: Vec::new(),
            },
        }
    }

    /// Who holds an id, for an error message.
    pub(super) fn holder(&self, id: u32) -> String {
        let target = self.add_request().map_or("?", |a| a.target.name());
        let state = self.state();
        match self.name() {
            Some(name) => format!("device {id} '{name}' ({target}, {state})"),
            None => format!("device {id} ({target}, {state})"),
        }
    }
}
