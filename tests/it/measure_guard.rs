//! `vramcal measure` refuses, before allocating, a point the planner puts above the memory free
//! on the machine. The child runs under an address-space limit so that a broken guard fails this
//! test with an allocation failure instead of pushing the test machine into swap.

#![cfg(target_os = "linux")]

use std::os::unix::process::CommandExt;
use std::process::Command;

#[test]
fn a_point_above_free_memory_is_refused_in_one_line() {
    // llama2-7b at batch 64 x 4096 tokens: the planner's total is terabytes, above any host
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vramcal"));
    cmd.args([
        "measure",
        "--model",
        "llama2-7b",
        "--batch",
        "64",
        "--seq",
        "4096",
        "--device",
        "cpu",
    ]);
    // SAFETY: setrlimit is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 8 << 30,
                rlim_max: 8 << 30,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let o = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let available = vramcal::harness::device::cpu_available_bytes().unwrap();
    assert!(
        err.contains("MemAvailable") && err.contains("--no-memory-guard"),
        "{err}"
    );
    // the planned bytes and the available bytes are both named
    let numbers: Vec<u64> = err
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    let planned = numbers.iter().copied().max().unwrap();
    assert!(planned > available, "{err}");
    assert!(
        numbers
            .iter()
            .any(|&n| n.abs_diff(available) < available / 10),
        "no number near MemAvailable {available} in {err}"
    );
}
