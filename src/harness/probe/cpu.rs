//! Counting global allocator: wraps the system allocator and keeps the bytes currently allocated
//! and their high-water mark in two atomics.
//!
//! Why a global allocator: candle's CPU backend allocates every tensor with `Vec`, so the heap
//! high-water mark during a step *is* the step's peak memory, including temporaries inside
//! kernels that no tensor-level accounting would see. The statics live in the library, so the
//! `vramcal` binary and every test binary that links it count the same way.
//!
//! Overhead: one `fetch_add`/`fetch_sub` and one `fetch_max` with `Relaxed` ordering per
//! allocation. Relaxed is enough: the counters are statistics, read after the measured code has
//! returned (and, for multi-threaded kernels, after rayon has joined its workers, which already
//! synchronises).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

static CURRENT: AtomicU64 = AtomicU64::new(0);
static PEAK: AtomicU64 = AtomicU64::new(0);

/// The allocator type; installed once below for the whole process.
pub struct CountingAlloc;

#[inline]
fn grew(bytes: usize) {
    let now = CURRENT.fetch_add(bytes as u64, Relaxed) + bytes as u64;
    PEAK.fetch_max(now, Relaxed);
}

#[inline]
fn shrank(bytes: usize) {
    CURRENT.fetch_sub(bytes as u64, Relaxed);
}

// SAFETY: every method forwards to `System` unchanged; the counters never affect the pointers.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        shrank(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            // Only the change in size is counted: a realloc that moves the block holds the old
            // and the new block together while it copies, inside `System.realloc`, where no
            // counter sees it, so during such a copy the peak can read low by the old size.
            if new_size > layout.size() {
                grew(new_size - layout.size());
            } else {
                shrank(layout.size() - new_size);
            }
        }
        p
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

/// Heap bytes allocated right now by this process (through the Rust allocator).
pub fn current_bytes() -> u64 {
    CURRENT.load(Relaxed)
}

/// Highest [`current_bytes`] since the process started or since the last [`reset_peak`].
pub fn peak_bytes() -> u64 {
    PEAK.load(Relaxed)
}

/// Starts a new high-water window: peak := current.
pub fn reset_peak() {
    PEAK.store(CURRENT.load(Relaxed), Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// The high-water mark is process-wide: a reset in one test between another test's
    /// allocation and its read of the peak drops the peak to the current bytes, which other
    /// threads may just have lowered (seen once in CI: 89 KB short of the 10 MB). These are the
    /// only tests in the library that reset it, so they take turns.
    static RESETS: Mutex<()> = Mutex::new(());

    #[test]
    fn a_10mb_vec_raises_the_peak_by_at_least_10mb() {
        let _turn = RESETS.lock().unwrap_or_else(|e| e.into_inner());
        reset_peak();
        let before = peak_bytes();
        let v = vec![1u8; 10 << 20];
        let during = peak_bytes();
        let cur = current_bytes();
        drop(std::hint::black_box(v));
        // other test threads free their own buffers meanwhile, which lowers the current bytes
        // the vec lands on (seen: 24 B and 89 KB short of the 10 MB); 1 MB of slack keeps the
        // check on the 10 MB vec, not on them
        assert!(
            during + (1 << 20) >= before + (10 << 20),
            "peak {before} -> {during}"
        );
        // Other test threads may allocate concurrently, so compare with a margin, not exactly.
        assert!(cur >= 10 << 20);
        assert!(peak_bytes() >= during);
    }

    #[test]
    fn reset_brings_the_peak_down_to_current() {
        let _turn = RESETS.lock().unwrap_or_else(|e| e.into_inner());
        {
            let v = vec![0u8; 4 << 20];
            std::hint::black_box(&v);
        }
        reset_peak();
        assert!(peak_bytes() < current_bytes() + (4 << 20));
    }
}
