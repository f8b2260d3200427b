//! Presences that leave all at once: an exited owner's (the resource's
//! `down` callback), a dropped replica's, those a sync found stale.
//!
//! A `down` callback cannot yield: an owner with 40k presences removed in
//! one go would hold its scheduler, and the table lock, for tens of
//! milliseconds. Up to [`DEPART_CHUNK`] presences go inline; more go a
//! chunk at a time from a short-lived thread, handing the lock to waiting
//! writers between chunks.

use std::sync::Arc;

use parking_lot::{Mutex, MutexGuard};
use presence_core::Departure;
use rustler::{Env, LocalPid, Monitor, OwnedEnv, Resource};

use crate::atoms;
use crate::resource::{Shared, Table, WakesDispatcher};
#[cfg(feature = "test-hooks")]
use crate::test_hooks::ExitHold;

/// Presences of a departure removed per hold of the lock (tens of
/// microseconds).
const DEPART_CHUNK: usize = 64;

/// Without the test hooks, timing an exit's lock holds costs nothing.
#[cfg(not(feature = "test-hooks"))]
struct ExitHold;

#[cfg(not(feature = "test-hooks"))]
impl ExitHold {
    fn start() -> Self {
        ExitHold
    }
}

#[rustler::resource_impl]
impl Resource for Table {
    const IMPLEMENTS_DOWN: bool = true;

    fn down<'a>(&'a self, env: Env<'a>, pid: LocalPid, monitor: Monitor) {
        let departure = {
            let mut state = self.lock();
            let _hold = ExitHold::start();
            // Only the monitor that watches the owner now may remove it: a
            // down message of an earlier, released monitor must not.
            if state.registry.watch(&pid) != Some(&monitor) {
                return;
            }
            state
                .registry
                .depart(pid)
                .map(|(_monitor, departure)| departure)
        };
        if let Some(departure) = departure {
            self.remove_detached(env, departure);
        }
    }
}

impl Table {
    /// Removes detached presences (an exited owner's, a dropped replica's):
    /// inline when they fit in one chunk, else a chunk at a time from a
    /// short-lived thread.
    pub(crate) fn remove_detached(&self, env: Env, mut departure: Departure) {
        if departure.remaining() <= DEPART_CHUNK {
            self.write(env, |registry| {
                let _hold = ExitHold::start();
                registry.remove_departed(&mut departure, DEPART_CHUNK)
            });
            return;
        }
        // Through a slot, so that a thread that cannot be spawned hands the
        // departure back instead of dropping it with its closure.
        let slot = Arc::new(Mutex::new(Some(departure)));
        let (shared, for_thread) = (Arc::clone(&self.0), Arc::clone(&slot));
        let spawned = std::thread::Builder::new()
            .name("presence-departure".into())
            .spawn(move || {
                if let Some(departure) = for_thread.lock().take() {
                    remove_in_chunks(&shared, departure);
                }
            });
        if spawned.is_err() {
            if let Some(departure) = slot.lock().take() {
                remove_in_chunks(self, departure);
            }
        }
    }
}

/// Removes a departure a chunk at a time, handing the lock to waiting
/// writers between chunks. Runs off the schedulers (in its own thread), so
/// it wakes the dispatcher from a process-less env.
fn remove_in_chunks(shared: &Shared, mut departure: Departure) {
    while !departure.is_done() {
        let mut state = shared.lock();
        let (removed, dispatcher) = {
            let _hold = ExitHold::start();
            let removed = state.registry.remove_departed(&mut departure, DEPART_CHUNK);
            (removed, state.dispatcher)
        };
        // Taking the lock straight back would keep every other writer
        // waiting for the whole departure.
        MutexGuard::unlock_fair(state);
        if let (true, Some(pid)) = (removed.wakes_dispatcher(), dispatcher) {
            let _ = OwnedEnv::new().send_and_clear(&pid, |_env| atoms::drab_presence_pending());
        }
    }
}
