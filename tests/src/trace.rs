//! Where a slow test spends its time (`UBLKD_TEST_TRACE`).

use std::time::Instant;

/// With `UBLKD_TEST_TRACE` set, runs `f` and prints how long it took as
/// `trace TEST +T what: D` on stderr (T since the test's first traced step; run the
/// binary with `--nocapture`): where a slow test spends its time. Without, just `f`.
pub fn traced<T>(what: impl FnOnce() -> String, f: impl FnOnce() -> T) -> T {
    thread_local!(static FIRST: Instant = Instant::now());
    if std::env::var_os("UBLKD_TEST_TRACE").is_none() {
        return f();
    }
    let since = FIRST.with(|t| t.elapsed());
    let start = Instant::now();
    let out = f();
    let thread = std::thread::current();
    eprintln!(
        "trace {} +{:.1}s {}: {:.2}s",
        thread.name().unwrap_or("?"),
        since.as_secs_f64(),
        what(),
        start.elapsed().as_secs_f64()
    );
    out
}
