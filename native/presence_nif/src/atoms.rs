//! Every atom the NIFs return or send.

rustler::atoms! {
    ok,
    error,
    already_tracked,
    not_tracked,
    noproc,
    stale,
    meta_too_large,
    // table_list: the topic belongs on a dirty scheduler.
    too_large,
    // The table lock is taken: yield and call again (Shared::try_lock).
    busy,
    // table_next_part: the outbox is empty.
    none,
    // Sent to the dispatcher on the first pending diff.
    drab_presence_pending,
    // Sent to the replicator when this node's changes start waiting.
    drab_presence_delta,
    bad_delta,
    replicas,
    // table_stats keys.
    presences,
    owners,
    topics,
    pending_topics,
    queued_parts,
    max_meta_bytes,
    nif_heap_bytes,
}
