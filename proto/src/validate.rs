//! Validation of device parameters, shared by the daemon (authoritative) and tests.

use crate::size::format_size;
use std::ops::RangeInclusive;
use thiserror::Error;

/// Deepest queue the ublk driver accepts (`UBLK_MAX_QUEUE_DEPTH`).
pub const MAX_DEPTH: u32 = 4096;
/// Most queues the ublk UAPI can address (`UBLK_MAX_NR_QUEUES`).
pub const MAX_QUEUES_UAPI: u32 = 4096;

pub const DEFAULT_QUEUES: u32 = 1;
pub const DEFAULT_DEPTH: u32 = 128;
pub const DEFAULT_BLOCK_SIZE: u32 = 512;
/// Size of a `null` device when none is given.
pub const DEFAULT_NULL_SIZE: u64 = 1 << 30;

/// Device ids the ublk driver hands out are below this (`UBLK_MAX_UBLKS`).
pub const MAX_DEVICE_ID: u32 = 1 << 20;
/// Longest device name.
pub const MAX_NAME_LEN: usize = 64;

/// Block sizes a device may have.
pub const BLOCK_SIZES: [u32; 2] = [512, 4096];

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ValidationError {
    #[error("size must be greater than 0")]
    ZeroSize,
    #[error("size {size} ({pretty}) is not a multiple of the block size {block_size}", pretty = format_size(*size))]
    SizeNotAligned { size: u64, block_size: u32 },
    #[error("block size {0} is not supported (use 512 or 4096)")]
    BlockSize(u32),
    #[error("queues must be at least 1")]
    ZeroQueues,
    #[error("queues {requested} is above the kernel's limit of {limit} (one queue per possible CPU at most)")]
    TooManyQueues { requested: u32, limit: u32 },
    #[error("depth must be at least 1")]
    ZeroDepth,
    #[error("depth {0} is above the ublk driver's limit of 4096")]
    DepthTooLarge(u32),
    #[error("device id {0} is out of range (0 to 1048575)")]
    DeviceId(u32),
    #[error("device id range '{0}' is not valid: give FIRST-LAST, two ids from 0 to 1048575 with FIRST <= LAST (e.g. 100-199)")]
    DeviceIdRange(String),
    #[error("device name '{0}' is not valid: use 1 to 64 letters, digits, '-', '_' or '.'")]
    Name(String),
    #[error("device name '{0}' is all digits, which commands read as a device id: add a letter")]
    NumericName(String),
}

/// The queue shape of a device, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub queues: u16,
    pub depth: u16,
    pub block_size: u32,
}

/// Validates queues, depth and block size, filling in defaults. `max_queues` is the
/// kernel's limit on this machine (the driver clamps to the number of possible CPUs, so
/// the daemon refuses more rather than silently creating fewer queues).
pub fn geometry(
    queues: Option<u32>,
    depth: Option<u32>,
    block_size: Option<u32>,
    max_queues: u32,
) -> Result<Geometry, ValidationError> {
    let queues = queues.unwrap_or(DEFAULT_QUEUES);
    let depth = depth.unwrap_or(DEFAULT_DEPTH);
    let block_size = block_size.unwrap_or(DEFAULT_BLOCK_SIZE);
    let limit = max_queues.clamp(1, MAX_QUEUES_UAPI);
    if queues == 0 {
        return Err(ValidationError::ZeroQueues);
    }
    if queues > limit {
        return Err(ValidationError::TooManyQueues {
            requested: queues,
            limit,
        });
    }
    if depth == 0 {
        return Err(ValidationError::ZeroDepth);
    }
    if depth > MAX_DEPTH {
        return Err(ValidationError::DepthTooLarge(depth));
    }
    if !BLOCK_SIZES.contains(&block_size) {
        return Err(ValidationError::BlockSize(block_size));
    }
    // Both fit: queues <= 4096 and depth <= 4096.
    Ok(Geometry {
        queues: queues as u16,
        depth: depth as u16,
        block_size,
    })
}

/// Checks a device id the user asked for.
pub fn device_id(id: u32) -> Result<u32, ValidationError> {
    if id >= MAX_DEVICE_ID {
        return Err(ValidationError::DeviceId(id));
    }
    Ok(id)
}

/// Parses a range of device ids, `FIRST-LAST` (both included), e.g. `100-199`.
pub fn device_id_range(text: &str) -> Result<RangeInclusive<u32>, ValidationError> {
    let bad = || ValidationError::DeviceIdRange(text.to_string());
    let (first, last) = text.split_once('-').ok_or_else(bad)?;
    let id = |s: &str| {
        let n = s.trim().parse::<u32>().map_err(|_| bad())?;
        device_id(n).map_err(|_| bad())
    };
    let (first, last) = (id(first)?, id(last)?);
    if first > last {
        return Err(bad());
    }
    Ok(first..=last)
}

/// Checks a device name: short, and safe in a file name, a log line or a shell; not all
/// digits, which commands read as a device id.
pub fn device_name(name: &str) -> Result<&str, ValidationError> {
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if name.is_empty() || name.len() > MAX_NAME_LEN || !name.chars().all(ok) {
        return Err(ValidationError::Name(name.to_string()));
    }
    if name.chars().all(|c| c.is_ascii_digit()) {
        return Err(ValidationError::NumericName(name.to_string()));
    }
    Ok(name)
}

/// Checks a device size against the block size.
pub fn device_size(size: u64, block_size: u32) -> Result<u64, ValidationError> {
    if size == 0 {
        return Err(ValidationError::ZeroSize);
    }
    if !size.is_multiple_of(u64::from(block_size)) {
        return Err(ValidationError::SizeNotAligned { size, block_size });
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_names() {
        assert_eq!(device_id(0), Ok(0));
        assert_eq!(device_id(MAX_DEVICE_ID - 1), Ok(MAX_DEVICE_ID - 1));
        assert_eq!(
            device_id(MAX_DEVICE_ID),
            Err(ValidationError::DeviceId(MAX_DEVICE_ID))
        );
        assert_eq!(device_id_range("100-199"), Ok(100..=199));
        assert_eq!(device_id_range("7-7"), Ok(7..=7));
        assert_eq!(device_id_range("0-1048575"), Ok(0..=MAX_DEVICE_ID - 1));
        for bad in ["", "5", "9-3", "1-1048576", "-5", "a-b", "1-2-3"] {
            assert_eq!(
                device_id_range(bad),
                Err(ValidationError::DeviceIdRange(bad.into())),
                "{bad}"
            );
        }
        assert_eq!(device_name("db-0.data_1"), Ok("db-0.data_1"));
        assert_eq!(device_name("0db"), Ok("0db"));
        assert_eq!(
            device_name("42"),
            Err(ValidationError::NumericName("42".into()))
        );
        for bad in ["", "a b", "x/y", "ü", &"n".repeat(65)] {
            assert!(device_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn defaults() {
        assert_eq!(
            geometry(None, None, None, 8),
            Ok(Geometry {
                queues: 1,
                depth: 128,
                block_size: 512
            })
        );
    }

    #[test]
    fn queue_limits() {
        assert_eq!(
            geometry(Some(0), None, None, 8),
            Err(ValidationError::ZeroQueues)
        );
        assert_eq!(geometry(Some(8), None, None, 8).unwrap().queues, 8);
        assert_eq!(
            geometry(Some(9), None, None, 8),
            Err(ValidationError::TooManyQueues {
                requested: 9,
                limit: 8
            })
        );
        assert_eq!(
            geometry(Some(5000), None, None, 10_000),
            Err(ValidationError::TooManyQueues {
                requested: 5000,
                limit: 4096
            })
        );
    }

    #[test]
    fn depth_limits() {
        assert_eq!(
            geometry(None, Some(0), None, 1),
            Err(ValidationError::ZeroDepth)
        );
        assert_eq!(geometry(None, Some(4096), None, 1).unwrap().depth, 4096);
        assert_eq!(
            geometry(None, Some(4097), None, 1),
            Err(ValidationError::DepthTooLarge(4097))
        );
    }

    #[test]
    fn block_sizes() {
        assert_eq!(
            geometry(None, None, Some(4096), 1).unwrap().block_size,
            4096
        );
        assert_eq!(
            geometry(None, None, Some(1024), 1),
            Err(ValidationError::BlockSize(1024))
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(device_size(0, 512), Err(ValidationError::ZeroSize));
        assert_eq!(device_size(4096, 4096), Ok(4096));
        assert_eq!(
            device_size(1000, 512),
            Err(ValidationError::SizeNotAligned {
                size: 1000,
                block_size: 512
            })
        );
        assert_eq!(
            device_size(6144, 4096).unwrap_err().to_string(),
            "size 6144 (6K) is not a multiple of the block size 4096"
        );
    }
}
