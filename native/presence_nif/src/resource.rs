//! The presence table resource, its locks, and how writes wake the
//! dispatcher.
//!
//! Lock order: `delivery`, then `state`; a kept listing (`kept.rs`),
//! then `state`; `replication` alone. Writers take
//! `state` only, and never wait for it on a normal scheduler
//! ([`Shared::try_lock`]).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, MutexGuard};
use presence_core::{random_seed, Change, Delivery, Meta, Registry, Removed, ReplicaId, Update};
use rustler::{Env, LocalPid, Monitor, NifResult, ResourceArc, Term};

use crate::atoms;
use crate::error::NifError;
use crate::kept::Listings;
use crate::size;
use crate::spin::spin_lock;

pub(crate) struct State {
    pub(crate) registry: Registry<LocalPid, Meta, Monitor>,
    /// Told (`:drab_presence_pending`) when the first pending diff appears.
    pub(crate) dispatcher: Option<LocalPid>,
}

/// A presence table: the resource handed to Elixir. Its contents live
/// behind an `Arc` so that a thread removing a large exited owner can hold
/// them without holding the resource.
pub struct Table(pub(crate) Arc<Shared>);

pub struct Shared {
    pub(crate) state: Mutex<State>,
    /// Diffs taken and not yet acknowledged as broadcast, and this node's
    /// changes for the other nodes. Writers never take this lock, so they
    /// never wait on a delivery.
    pub(crate) delivery: Mutex<Delivery<LocalPid, Meta>>,
    pub(crate) replication: Mutex<Replication>,
    /// Names this table's replica on other nodes: a node that restarts gets
    /// a new one, so what others held of its previous life is dropped.
    pub(crate) incarnation: uuid::Uuid,
    max_meta_bytes: AtomicUsize,
    /// Large topics' listings, kept as terms between lists. Lock order:
    /// a kept listing, then `state`.
    pub(crate) listings: Listings,
}

// A panic in a NIF (caught by rustler) may unwind while a lock is held.
// parking_lot does not poison, so the next caller sees the data as the
// panic left it: core operations check before they change anything, and
// the outbox only pushes and pops whole parts, so that is a consistent
// state.
impl std::panic::RefUnwindSafe for Shared {}

impl std::ops::Deref for Table {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// Who cluster mode tells of this node's changes, and the ids of the peers
/// whose presences are held here.
#[derive(Default)]
pub(crate) struct Replication {
    /// Told (`:drab_presence_delta`) when changes start waiting; `None`
    /// outside cluster mode, when no delta is recorded at all.
    pub(crate) replicator: Option<LocalPid>,
    /// The replica id of each peer (by its name, as the replicator encodes
    /// it), kept with the table so that a restarted replicator finds which
    /// presences are whose.
    pub(crate) replica_ids: std::collections::HashMap<Vec<u8>, ReplicaId>,
    pub(crate) last_replica_id: ReplicaId,
}

impl Table {
    pub(crate) fn new(max_meta_bytes: usize) -> ResourceArc<Table> {
        ResourceArc::new(Table(Arc::new(Shared {
            state: Mutex::new(State {
                registry: Registry::new(random_seed()),
                dispatcher: None,
            }),
            delivery: Mutex::new(Delivery::new(0)),
            replication: Mutex::new(Replication::default()),
            incarnation: uuid::Uuid::new_v4(),
            max_meta_bytes: AtomicUsize::new(max_meta_bytes),
            listings: Listings::default(),
        })))
    }
}

/// What a write did that may call for the dispatcher.
pub(crate) trait WakesDispatcher {
    fn wakes_dispatcher(&self) -> bool;
}

impl WakesDispatcher for Change {
    fn wakes_dispatcher(&self) -> bool {
        self.wake
    }
}

impl WakesDispatcher for Update {
    fn wakes_dispatcher(&self) -> bool {
        matches!(self, Update::Changed(change) if change.wake)
    }
}

impl<W> WakesDispatcher for Removed<W> {
    fn wakes_dispatcher(&self) -> bool {
        self.wake
    }
}

impl<T: WakesDispatcher, E> WakesDispatcher for Result<T, E> {
    fn wakes_dispatcher(&self) -> bool {
        self.as_ref().is_ok_and(T::wakes_dispatcher)
    }
}

/// Tells the dispatcher about the first pending diff, if `change` made it.
/// Called with the lock released.
pub(crate) fn wake_if_needed(
    env: Env,
    change: &impl WakesDispatcher,
    dispatcher: Option<LocalPid>,
) {
    if let (true, Some(pid)) = (change.wakes_dispatcher(), dispatcher) {
        // A dead dispatcher is fine: its successor drains on start.
        let _ = env.send(&pid, atoms::drab_presence_pending());
    }
}

impl Shared {
    /// The registry lock, waited for: off the normal schedulers only (a
    /// dirty NIF, a thread of ours, a `down` callback). parking_lot's: it
    /// can be handed over fairly, and a panic under it (caught by rustler)
    /// leaves no poison behind; core operations do not panic mid-change,
    /// so the data is safe to reuse.
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock()
    }

    /// The lock for a NIF on a normal scheduler: taken if it is free, or
    /// comes free within a few microseconds; otherwise `None`, and the NIF
    /// answers `:busy` for its caller to yield and call again. Waiting in
    /// the lock would park the scheduler's thread, and with it every
    /// process queued on that scheduler, until the OS runs it again: with
    /// four writers on two cores, that was up to 20 ms at a time.
    pub(crate) fn try_lock(&self) -> Option<MutexGuard<'_, State>> {
        spin_lock(&self.state)
    }

    /// [`Shared::try_lock`] for the delivery (the dispatcher's and the
    /// replicator's NIFs).
    pub(crate) fn try_lock_delivery(&self) -> Option<MutexGuard<'_, Delivery<LocalPid, Meta>>> {
        spin_lock(&self.delivery)
    }

    /// [`Shared::write`] for a NIF on a normal scheduler: `None`, having
    /// changed nothing, when the lock is busy (see [`Shared::try_lock`]).
    pub(crate) fn try_write<T: WakesDispatcher>(
        &self,
        env: Env,
        change: impl FnOnce(&mut Registry<LocalPid, Meta, Monitor>) -> T,
    ) -> Option<T> {
        let (result, dispatcher) = {
            let mut state = self.try_lock()?;
            (change(&mut state.registry), state.dispatcher)
        };
        wake_if_needed(env, &result, dispatcher);
        Some(result)
    }

    /// Runs `change` under the lock, then, with the lock released, tells
    /// the dispatcher if this change made the first pending diff. Off the
    /// normal schedulers only (see [`Shared::lock`]).
    pub(crate) fn write<T: WakesDispatcher>(
        &self,
        env: Env,
        change: impl FnOnce(&mut Registry<LocalPid, Meta, Monitor>) -> T,
    ) -> T {
        let (result, dispatcher) = {
            let mut state = self.lock();
            (change(&mut state.registry), state.dispatcher)
        };
        wake_if_needed(env, &result, dispatcher);
        result
    }

    pub(crate) fn set_max_meta_bytes(&self, max_meta_bytes: usize) {
        self.max_meta_bytes.store(max_meta_bytes, Ordering::Relaxed);
    }

    pub(crate) fn max_meta_bytes(&self) -> usize {
        self.max_meta_bytes.load(Ordering::Relaxed)
    }

    /// Encodes a meta with `term_to_binary/1`. A non-map is a caller bug
    /// (Elixir checks first) and raises badarg; an oversized one is refused,
    /// before it is encoded when its size shows without encoding.
    pub(crate) fn encode_meta(&self, meta: Term) -> NifResult<Result<Meta, NifError>> {
        if !meta.is_map() {
            return Err(rustler::Error::BadArg);
        }
        let max_meta_bytes = self.max_meta_bytes();
        if size::exceeds(meta, max_meta_bytes) {
            return Ok(Err(NifError::MetaTooLarge));
        }
        let encoded = meta.to_binary();
        if encoded.len() > max_meta_bytes {
            return Ok(Err(NifError::MetaTooLarge));
        }
        presence_core::etf::check_meta(&encoded).map_err(|_| rustler::Error::BadArg)?;
        Ok(Ok(Meta::from(encoded.as_slice())))
    }
}
