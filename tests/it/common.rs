//! Helpers shared by the test modules: running the vramcal binary, and running a test alone in
//! its own process.

use std::process::Command;

/// Runs the vramcal binary from the repository root: (exit code, stdout, stderr). A process
/// ended by a signal reports -1.
pub fn vramcal(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_vramcal"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run vramcal");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Whether the calling test should run its body here. A test that reads the allocator counters
/// (`harness::probe::cpu`) needs the process to itself: the counters are process-wide, and the
/// other tests of this binary allocate on other threads meanwhile. So the test runs again in a
/// child process of this binary, alone (`--exact`, one thread), this call fails the test if the
/// child's run did not pass, and returns false; in the child (or where the test already runs on
/// the main thread, `--test-threads=1`) it returns true.
pub fn alone() -> bool {
    const CHILD: &str = "VRAMCAL_TEST_ALONE";
    if std::env::var_os(CHILD).is_some() {
        return true;
    }
    let thread = std::thread::current();
    let Some(name) = thread.name().filter(|n| *n != "main") else {
        return true;
    };
    let out = Command::new(std::env::current_exe().expect("test binary path"))
        .args([name, "--exact", "--test-threads=1", "--include-ignored"])
        .env(CHILD, "1")
        .output()
        .expect("run the test binary");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("test result: ok. 1 passed"),
        "{name}, run alone: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    false
}
