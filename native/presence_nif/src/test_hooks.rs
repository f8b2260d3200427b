//! NIFs for the ExUnit suite only (cargo feature `test-hooks`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Panics, to show that a Rust panic reaches Elixir as an exception and
/// leaves the VM, and the table, running.
#[rustler::nif]
fn test_panic() -> rustler::Atom {
    panic!("deliberate panic from test_panic/0")
}

/// The longest the table lock was held for an exited owner, in µs: what
/// keeps every other writer waiting while a large owner goes.
static LONGEST_EXIT_HOLD_US: AtomicU64 = AtomicU64::new(0);

/// Times one hold of the table lock for an exit, from `start` to its drop.
pub struct ExitHold(Instant);

impl ExitHold {
    pub fn start() -> Self {
        ExitHold(Instant::now())
    }
}

impl Drop for ExitHold {
    fn drop(&mut self) {
        let held = self.0.elapsed().as_micros() as u64;
        LONGEST_EXIT_HOLD_US.fetch_max(held, Ordering::Relaxed);
    }
}

/// The longest exit hold since the last call, and starts over.
#[rustler::nif]
fn test_take_longest_exit_hold_us() -> u64 {
    LONGEST_EXIT_HOLD_US.swap(0, Ordering::Relaxed)
}
