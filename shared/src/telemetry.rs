//! Logging set up once: one JSON object per line on stdout, as log collectors expect.

use tracing::Level;

/// Installs the JSON subscriber at `level` (already checked by [`crate::Config`]), writing to
/// stdout as servers do. Calling it twice is harmless, which the tests rely on.
pub fn init(level: &str) {
    init_with(level, std::io::stdout);
}

/// The same, on stderr: for commands whose stdout is their result (`backup run` prints its
/// report there).
pub fn init_stderr(level: &str) {
    init_with(level, std::io::stderr);
}

fn init_with<W>(level: &str, writer: W)
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let level = level.parse().unwrap_or(Level::INFO);
    let _ = tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_span_list(false)
        .with_max_level(level)
        .with_writer(writer)
        .try_init();
}

/// For test binaries: logs only when `TEST_LOG` is set, so a passing run stays quiet.
pub fn init_for_tests() {
    if std::env::var_os("TEST_LOG").is_some() {
        init("debug");
    }
}
