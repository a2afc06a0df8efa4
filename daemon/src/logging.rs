//! Where ublkd's log lines go.
//!
//! Under systemd (stderr is the journal: JOURNAL_STREAM names it), each line goes to
//! journald natively (systemd-journal-logger), with its level as the syslog priority
//! (error 3, warn 4, info 5, debug 6, trace 7), so `journalctl -u ublkd -p err` shows the
//! errors alone. Lines about a device carry it as fields: the daemon's messages start
//! with `dev N` and, for a queue, `dev N queue Q` (and `tag T`), which become
//! UBLKD_DEVICE, UBLKD_QUEUE and UBLKD_TAG (`journalctl UBLKD_DEVICE=3`); a line from a
//! queue thread (named `ublkNqM`, as the targets' lines are) names its device and queue.
//! Anywhere else the lines go to stderr through env_logger, as before. RUST_LOG filters
//! both (default `info`).

use log::kv::{Key, Value};
use log::{Log, Metadata, Record};
use systemd_journal_logger::JournalLog;

/// Installs the logger; call once, first thing in main.
pub fn init() {
    let env = env_logger::Env::default().default_filter_or("info");
    let filter = env_logger::Builder::from_env(env).build();
    if systemd_journal_logger::connected_to_journal() {
        match JournalLog::new() {
            Ok(journal) => {
                log::set_max_level(filter.filter());
                let journal = journal.with_syslog_identifier("ublkd".into());
                if log::set_boxed_logger(Box::new(Journal { journal, filter })).is_ok() {
                    return;
                }
            }
            Err(e) => eprintln!("ublkd: cannot log to the journal ({e}); logging to stderr"),
        }
    }
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
}

struct Journal {
    journal: JournalLog,
    filter: env_logger::Logger,
}

impl Log for Journal {
    fn enabled(&self, metadata: &Metadata) -> bool {
        self.filter.enabled(metadata)
    }

    fn log(&self, record: &Record) {
        if !self.filter.matches(record) {
            return;
        }
        let text = record.args().to_string();
        let mut fields = device_fields(&text);
        if fields.is_empty() {
            fields = queue_thread_fields(std::thread::current().name().unwrap_or(""));
        }
        let kv: Vec<(Key, Value)> = fields
            .iter()
            .map(|(k, v)| (Key::from_str(k), Value::from(*v)))
            .collect();
        let _ = self.journal.journal_send(
            &Record::builder()
                .args(format_args!("{text}"))
                .level(record.level())
                .target(record.target())
                .module_path(record.module_path())
                .file(record.file())
                .line(record.line())
                .key_values(&kv)
                .build(),
        );
    }

    fn flush(&self) {}
}

/// The device, queue and tag a message names in its `dev N[ queue Q][ tag T]` prefix.
fn device_fields(text: &str) -> Vec<(&'static str, u64)> {
    let mut fields = Vec::new();
    let mut words = text.split([' ', ':']);
    for name in ["UBLKD_DEVICE", "UBLKD_QUEUE", "UBLKD_TAG"] {
        let expected = match name {
            "UBLKD_DEVICE" => "dev",
            "UBLKD_QUEUE" => "queue",
            _ => "tag",
        };
        if words.next() != Some(expected) {
            break;
        }
        match words.next().and_then(|n| n.parse().ok()) {
            Some(n) => fields.push((name, n)),
            None => break,
        }
    }
    fields
}

/// The device and queue of a queue thread, from its name `ublk{dev}q{queue}`.
fn queue_thread_fields(thread: &str) -> Vec<(&'static str, u64)> {
    let ids = thread
        .strip_prefix("ublk")
        .and_then(|rest| rest.split_once('q'));
    match ids.map(|(d, q)| (d.parse(), q.parse())) {
        Some((Ok(d), Ok(q))) => vec![("UBLKD_DEVICE", d), ("UBLKD_QUEUE", q)],
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::{device_fields, queue_thread_fields};

    #[test]
    fn a_queue_thread_names_its_device_and_queue() {
        assert_eq!(
            queue_thread_fields("ublk7q2"),
            [("UBLKD_DEVICE", 7), ("UBLKD_QUEUE", 2)]
        );
        assert!(queue_thread_fields("ublkd-accept").is_empty());
        assert!(queue_thread_fields("ublkd-conn").is_empty());
        assert!(queue_thread_fields("main").is_empty());
    }

    #[test]
    fn the_message_prefix_names_device_queue_and_tag() {
        assert_eq!(
            device_fields("dev 3 queue 1 tag 17: delivered while still in flight"),
            [("UBLKD_DEVICE", 3), ("UBLKD_QUEUE", 1), ("UBLKD_TAG", 17)]
        );
        assert_eq!(
            device_fields("dev 12 queue 0: cannot re-arm the wake-up"),
            [("UBLKD_DEVICE", 12), ("UBLKD_QUEUE", 0)]
        );
        assert_eq!(
            device_fields("dev 4: cannot be restored"),
            [("UBLKD_DEVICE", 4)]
        );
        assert!(device_fields("device record /x: bad").is_empty());
        assert!(device_fields("listening on /run/ublkd/ublkd.sock").is_empty());
        assert!(device_fields("dev x: odd").is_empty());
    }
}
