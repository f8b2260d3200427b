//! Taking a lock on a normal scheduler, where a NIF must not wait.

use std::time::{Duration, Instant};

use parking_lot::{Mutex, MutexGuard};

/// How long a NIF on a normal scheduler spins for the table lock before
/// it answers `:busy` (see `Shared::try_lock`): a few times the longest
/// a writer holds it.
const LOCK_SPIN: Duration = Duration::from_micros(20);

/// A lock taken if it is free or comes free within [`LOCK_SPIN`].
pub(crate) fn spin_lock<T>(lock: &Mutex<T>) -> Option<MutexGuard<'_, T>> {
    if let Some(guard) = lock.try_lock() {
        return Some(guard);
    }
    let started = Instant::now();
    while started.elapsed() < LOCK_SPIN {
        for _ in 0..64 {
            std::hint::spin_loop();
        }
        if let Some(guard) = lock.try_lock() {
            return Some(guard);
        }
    }
    None
}
