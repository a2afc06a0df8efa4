//! Names of the ublk driver's feature bits (`UBLK_F_*` in `include/uapi/linux/ublk_cmd.h`).

/// (bit, name) of every feature this build knows.
pub const FEATURES: &[(u32, &str)] = &[
    (0, "SUPPORT_ZERO_COPY"),
    (1, "URING_CMD_COMP_IN_TASK"),
    (2, "NEED_GET_DATA"),
    (3, "USER_RECOVERY"),
    (4, "USER_RECOVERY_REISSUE"),
    (5, "UNPRIVILEGED_DEV"),
    (6, "CMD_IOCTL_ENCODE"),
    (7, "USER_COPY"),
    (8, "ZONED"),
    (9, "USER_RECOVERY_FAIL_IO"),
    (10, "UPDATE_SIZE"),
    (11, "AUTO_BUF_REG"),
    (12, "QUIESCE"),
    (13, "PER_IO_DAEMON"),
    (14, "BUF_REG_OFF_DAEMON"),
    (15, "BATCH_IO"),
    (16, "INTEGRITY"),
    (17, "SAFE_STOP_DEV"),
    (18, "NO_AUTO_PART_SCAN"),
    (19, "SHMEM_ZC"),
];

/// Splits a feature mask into the names this build knows and the bits it does not.
pub fn decode(bits: u64) -> (Vec<String>, u64) {
    let mut names = Vec::new();
    let mut unknown = bits;
    for &(bit, name) in FEATURES {
        if bits & (1u64 << bit) != 0 {
            names.push(name.to_string());
            unknown &= !(1u64 << bit);
        }
    }
    (names, unknown)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_known_and_unknown_bits() {
        let (names, unknown) = decode((1 << 0) | (1 << 6) | (1 << 11) | (1 << 40));
        assert_eq!(
            names,
            ["SUPPORT_ZERO_COPY", "CMD_IOCTL_ENCODE", "AUTO_BUF_REG"]
        );
        assert_eq!(unknown, 1 << 40);
        assert_eq!(decode(0), (vec![], 0));
    }

    #[test]
    fn table_has_unique_bits_in_order() {
        for pair in FEATURES.windows(2) {
            assert!(pair[0].0 < pair[1].0);
        }
    }
}
