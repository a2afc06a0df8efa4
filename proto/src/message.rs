//! Requests and responses on the control socket.
//!
//! Wire format: one JSON object per line. A request names its command in `"cmd"`:
//!
//! ```json
//! {"cmd":"add","target":{"type":"null","size":1073741824},"queues":2}
//! {"cmd":"del","ids":[0,"db"]}
//! {"cmd":"list"}
//! ```
//!
//! A response is externally tagged: `{"added":{...}}`, `{"error":"..."}`, and so on.

use crate::options::{BufferMode, CommandMode, QueueAffinity};
use serde::{Deserialize, Serialize};

pub use crate::target_spec::TargetSpec;

/// A command for the daemon.
// One request per control call: `Add`'s size costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    /// Create a device and start serving it.
    Add(AddDevice),
    /// Delete the listed devices (all of them, or none if one is unknown or, without
    /// `force`, in use).
    Del {
        ids: Vec<DeviceRef>,
        /// Delete devices that are mounted or open too (their IO then fails).
        #[serde(default, skip_serializing_if = "is_false")]
        force: bool,
    },
    /// Delete every device the daemon serves (none, without `force`, if one is in use).
    DelAll {
        #[serde(default, skip_serializing_if = "is_false")]
        force: bool,
    },
    /// Summaries of every device.
    List,
    /// One device in detail.
    Show { id: DeviceRef },
    /// The kernel's ublk feature bits.
    Features,
    /// Every device in detail, with its counters (`ublkctl stats`).
    Stats,
    /// Serve again a device the kernel still holds (after a crash) or whose restore
    /// failed, from its record.
    Recover { id: DeviceRef },
    /// Give a served device a new size (UBLK_U_CMD_UPDATE_SIZE, Linux 6.16): `size`
    /// bytes, or for loop its backing file's size now; `grow_file` grows a loop
    /// device's file to `size` first.
    Resize {
        id: DeviceRef,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        size: Option<u64>,
        #[serde(default, skip_serializing_if = "is_false")]
        grow_file: bool,
    },
}

pub(crate) fn is_false(b: &bool) -> bool {
    !*b
}

/// A device as a command names it: by id (a JSON number) or by name (a JSON string).
/// Names cannot be all digits (`validate::device_name`), so `ublkctl show 3` always
/// means id 3.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum DeviceRef {
    Id(u32),
    Name(String),
}

impl std::str::FromStr for DeviceRef {
    type Err = std::convert::Infallible;

    /// Digits are an id, anything else a name.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.parse() {
            Ok(id) => DeviceRef::Id(id),
            Err(_) => DeviceRef::Name(s.to_string()),
        })
    }
}

impl std::fmt::Display for DeviceRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceRef::Id(id) => write!(f, "{id}"),
            DeviceRef::Name(name) => write!(f, "'{name}'"),
        }
    }
}

impl From<u32> for DeviceRef {
    fn from(id: u32) -> Self {
        DeviceRef::Id(id)
    }
}

/// Parameters of `add`. Fields left out take the daemon's defaults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddDevice {
    pub target: TargetSpec,
    /// The device id to use (/dev/ublkbID); the kernel picks a free one when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u32>,
    /// A label for the device, unique among the daemon's devices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queues: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub depth: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_size: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub buffer: Option<BufferMode>,
    /// The batch command path (UBLK_F_BATCH_IO): `Some(true)` asks for it (an error on a
    /// kernel without it), `Some(false)` or left out: the per-tag path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<bool>,
    /// Where the queue threads run [default: [`TargetSpec::default_affinity`]].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<QueueAffinity>,
}

impl AddDevice {
    /// Where the queue threads run: as asked, else the target's default.
    pub fn affinity(&self) -> QueueAffinity {
        self.affinity
            .unwrap_or_else(|| self.target.default_affinity())
    }
}

/// The daemon's answer to one request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Response {
    Added(DeviceInfo),
    Recovered(DeviceInfo),
    Resized(DeviceInfo),
    Deleted { ids: Vec<u32> },
    Devices(Vec<DeviceInfo>),
    Device(DeviceDetail),
    Features(FeatureReport),
    Stats(Vec<DeviceDetail>),
    Error(String),
}

/// One row of `list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    pub id: u32,
    pub target: String,
    /// Size in bytes.
    pub size: u64,
    pub block_size: u32,
    pub queues: u32,
    pub depth: u32,
    pub buffer: BufferMode,
    /// How the queues talk to the driver; absent while the device is not served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commands: Option<CommandMode>,
    /// Where the queue threads run.
    #[serde(default)]
    pub affinity: QueueAffinity,
    /// The kernel's device state: `live`, `quiesced`, `fail_io`, `dead`.
    pub state: String,
    /// Block device node, e.g. `/dev/ublkb0`.
    pub path: String,
    /// The device's label, if it was given one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Why the device is not being served (its state is then `failed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// What the device was added with: the backing file, the URI, the target's options
    /// (absent only for a record that could not be read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<TargetSpec>,
}

/// `show`: a device with its kernel view and per-queue counters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceDetail {
    #[serde(flatten)]
    pub info: DeviceInfo,
    /// Character device, e.g. `/dev/ublkc0`.
    pub char_path: String,
    /// Target-specific facts, as (name, value) pairs in display order (none while the
    /// device is not served).
    pub target_details: Vec<(String, String)>,
    /// The kernel's view; absent while the device is not served or the kernel cannot
    /// be asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<KernelDeviceInfo>,
    /// The target's own counters, as (name, value): `reconnects` for nbd.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub target_counters: Vec<(String, u64)>,
    pub queue_stats: Vec<QueueStats>,
}

/// What the kernel reports for a device (UBLK_U_CMD_GET_DEV_INFO).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelDeviceInfo {
    pub state: String,
    pub flags: u64,
    pub flag_names: Vec<String>,
    pub ublksrv_pid: i32,
    pub max_io_buf_bytes: u32,
    pub nr_hw_queues: u32,
    pub queue_depth: u32,
}

/// Counters of one hardware queue, since the device was added.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueStats {
    pub queue: u32,
    /// Linux thread id of the queue thread.
    pub tid: i32,
    /// The CPUs the queue thread may run on, as a CPU list (`3`, `0-1,4`); empty when it
    /// is not pinned.
    #[serde(default)]
    pub cpus: String,
    pub requests: u64,
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub discards: u64,
    pub write_zeroes: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Requests completed with an error.
    pub errors: u64,
    /// Requests handed to the target and not yet completed.
    pub inflight: u64,
}

/// `features`: the driver's UBLK_F_* bits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeatureReport {
    pub bits: u64,
    /// Names of the bits that are set and known to this build.
    pub names: Vec<String>,
    /// Bits that are set but unknown to this build.
    pub unknown_bits: u64,
}

/// Why a control request line was refused.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("malformed request: longer than {} bytes", crate::MAX_REQUEST_BYTES)]
    TooLong,
    #[error("malformed request: not UTF-8 ({0})")]
    NotUtf8(std::str::Utf8Error),
    #[error("malformed request: empty")]
    Empty,
    #[error("malformed request: {0}")]
    Json(serde_json::Error),
}

/// Parses one request line as the daemon reads it from its control socket (with or
/// without the newline). Never panics, whatever the bytes.
pub fn parse_request(line: &[u8]) -> Result<Request, RequestError> {
    if line.len() > crate::MAX_REQUEST_BYTES {
        return Err(RequestError::TooLong);
    }
    let text = std::str::from_utf8(line).map_err(RequestError::NotUtf8)?;
    if text.trim().is_empty() {
        return Err(RequestError::Empty);
    }
    serde_json::from_str(text.trim()).map_err(RequestError::Json)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::options::DirectIo;

    #[test]
    fn request_wire_format() {
        let req = Request::Add(AddDevice {
            target: TargetSpec::Null { size: 1 << 30 },
            id: None,
            name: None,
            queues: Some(2),
            depth: None,
            block_size: Some(4096),
            buffer: Some(BufferMode::Copy),
            batch: None,
            affinity: Some(QueueAffinity::Off),
        });
        let text = serde_json::to_string(&req).unwrap();
        assert_eq!(
            text,
            r#"{"cmd":"add","target":{"type":"null","size":1073741824},"queues":2,"block_size":4096,"buffer":"copy","affinity":"off"}"#
        );
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), req);

        for (req, text) in [
            (
                Request::Del {
                    ids: vec![0.into(), DeviceRef::Name("db".into())],
                    force: false,
                },
                r#"{"cmd":"del","ids":[0,"db"]}"#,
            ),
            (
                Request::Del {
                    ids: vec![1.into()],
                    force: true,
                },
                r#"{"cmd":"del","ids":[1],"force":true}"#,
            ),
            (Request::DelAll { force: false }, r#"{"cmd":"del_all"}"#),
            (
                Request::DelAll { force: true },
                r#"{"cmd":"del_all","force":true}"#,
            ),
            (Request::List, r#"{"cmd":"list"}"#),
            (Request::Show { id: 7.into() }, r#"{"cmd":"show","id":7}"#),
            (
                Request::Show {
                    id: DeviceRef::Name("db".into()),
                },
                r#"{"cmd":"show","id":"db"}"#,
            ),
            (Request::Features, r#"{"cmd":"features"}"#),
            (Request::Stats, r#"{"cmd":"stats"}"#),
            (
                Request::Recover { id: 2.into() },
                r#"{"cmd":"recover","id":2}"#,
            ),
        ] {
            assert_eq!(serde_json::to_string(&req).unwrap(), text);
            assert_eq!(serde_json::from_str::<Request>(text).unwrap(), req);
        }
    }

    #[test]
    fn digits_are_an_id_and_anything_else_a_name() {
        assert_eq!("12".parse::<DeviceRef>().unwrap(), DeviceRef::Id(12));
        assert_eq!("db".parse::<DeviceRef>(), Ok(DeviceRef::Name("db".into())));
        assert_eq!(
            "db-1".parse::<DeviceRef>(),
            Ok(DeviceRef::Name("db-1".into()))
        );
        // Too large for an id: a name, which no device can have (not all digits).
        assert_eq!(
            "99999999999".parse::<DeviceRef>(),
            Ok(DeviceRef::Name("99999999999".into()))
        );
    }

    #[test]
    fn malformed_requests_are_rejected() {
        for bad in [
            "",
            "not json",
            "{}",
            r#"{"cmd":"explode"}"#,
            r#"{"cmd":"add"}"#,
            r#"{"cmd":"add","target":{"type":"tape","size":1}}"#,
            r#"{"cmd":"add","target":{"type":"null","size":-1}}"#,
            r#"{"cmd":"add","target":{"type":"null","size":1},"colour":"red"}"#,
            r#"{"cmd":"show","id":true}"#,
            r#"{"cmd":"show","id":-1}"#,
            r#"{"cmd":"show","id":1.5}"#,
            r#"{"cmd":"del","ids":[1, -2]}"#,
        ] {
            assert!(
                serde_json::from_str::<Request>(bad).is_err(),
                "accepted: {bad}"
            );
        }
    }

    #[test]
    fn response_round_trip() {
        let info = DeviceInfo {
            id: 0,
            target: "null".into(),
            size: 1 << 30,
            block_size: 512,
            queues: 1,
            depth: 128,
            buffer: BufferMode::Copy,
            commands: Some(CommandMode::Batch),
            affinity: QueueAffinity::Cpu,
            state: "live".into(),
            path: "/dev/ublkb0".into(),
            name: Some("db".into()),
            error: None,
            spec: Some(TargetSpec::Null { size: 1 << 30 }),
        };
        for resp in [
            Response::Added(info.clone()),
            Response::Devices(vec![info.clone()]),
            Response::Deleted { ids: vec![0] },
            Response::Error("boom".into()),
            Response::Device(DeviceDetail {
                info,
                char_path: "/dev/ublkc0".into(),
                target_details: vec![("size".into(), "1G".into())],
                kernel: Some(KernelDeviceInfo {
                    state: "live".into(),
                    flags: 0x40,
                    flag_names: vec!["CMD_IOCTL_ENCODE".into()],
                    ublksrv_pid: 1,
                    max_io_buf_bytes: 524288,
                    nr_hw_queues: 1,
                    queue_depth: 128,
                }),
                queue_stats: vec![QueueStats::default()],
                target_counters: vec![("reconnects".into(), 2)],
            }),
        ] {
            let text = serde_json::to_string(&resp).unwrap();
            assert_eq!(serde_json::from_str::<Response>(&text).unwrap(), resp);
        }
    }

    #[test]
    fn buffer_mode_names() {
        for m in BufferMode::ALL {
            assert_eq!(m.name().parse::<BufferMode>().unwrap(), m);
            let json = serde_json::to_string(&m).unwrap();
            assert_eq!(json, format!("\"{}\"", m.name()));
        }
        assert!("turbo".parse::<BufferMode>().is_err());
        for d in DirectIo::ALL {
            assert_eq!(d.name().parse::<DirectIo>().unwrap(), d);
        }
        assert!("maybe".parse::<DirectIo>().is_err());
    }

    #[test]
    fn batch_choice_is_optional_and_recorded() {
        let old = r#"{"cmd":"add","target":{"type":"null","size":4096}}"#;
        let Request::Add(add) = serde_json::from_str::<Request>(old).unwrap() else {
            panic!()
        };
        assert_eq!(add.batch, None);
        let no = r#"{"cmd":"add","target":{"type":"null","size":4096},"batch":false}"#;
        let Request::Add(add) = serde_json::from_str::<Request>(no).unwrap() else {
            panic!()
        };
        assert_eq!(add.batch, Some(false));
        assert_eq!(serde_json::to_string(&Request::Add(add)).unwrap(), no);
        for (m, name) in [
            (CommandMode::Batch, "batch"),
            (CommandMode::PerTag, "per-tag"),
        ] {
            assert_eq!(serde_json::to_string(&m).unwrap(), format!("\"{name}\""));
            assert_eq!(m.name(), name);
        }
    }

    #[test]
    fn affinity_defaults_by_target_and_is_overridden() {
        let add = |json: &str| match serde_json::from_str::<Request>(json).unwrap() {
            Request::Add(add) => add,
            other => panic!("not an add: {other:?}"),
        };
        let null = add(r#"{"cmd":"add","target":{"type":"null","size":4096}}"#);
        assert_eq!(null.affinity, None);
        assert_eq!(null.affinity(), QueueAffinity::Cpu);
        let nbd = r#"{"cmd":"add","target":{"type":"nbd","uri":"nbd://h/"}}"#;
        assert_eq!(add(nbd).affinity(), QueueAffinity::Set);
        let pinned = r#"{"cmd":"add","target":{"type":"nbd","uri":"nbd://h/"},"affinity":"cpu"}"#;
        assert_eq!(add(pinned).affinity(), QueueAffinity::Cpu);
        let loose = r#"{"cmd":"add","target":{"type":"null","size":4096},"affinity":"off"}"#;
        assert_eq!(add(loose).affinity(), QueueAffinity::Off);
    }

    #[test]
    fn loop_spec_defaults() {
        let req: Request =
            serde_json::from_str(r#"{"cmd":"add","target":{"type":"loop","file":"/x"}}"#).unwrap();
        let Request::Add(add) = req else { panic!() };
        assert_eq!(
            add.target,
            TargetSpec::Loop {
                file: "/x".into(),
                direct_io: DirectIo::Auto,
                read_only: false
            }
        );
        let full = r#"{"cmd":"add","target":{"type":"loop","file":"/x","direct_io":"on","read_only":true},"buffer":"auto-zc"}"#;
        let Request::Add(add) = serde_json::from_str::<Request>(full).unwrap() else {
            panic!()
        };
        assert_eq!(add.buffer, Some(BufferMode::AutoZc));
        assert!(matches!(
            add.target,
            TargetSpec::Loop {
                direct_io: DirectIo::On,
                read_only: true,
                ..
            }
        ));
    }
}
