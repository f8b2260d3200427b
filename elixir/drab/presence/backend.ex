defmodule Drab.Presence.Backend do
  @moduledoc false
  # Where a presence table lives. The NIF backend keeps it in this VM; the
  # sidecar backend (next) keeps it in a port process. Callers talk to a
  # backend directly, with the handle from `new/1`: no process in between.
  #
  # Diffs are delivered at least once: `take_diffs/2` moves pending diffs
  # into an outbox as parts, `next_part/1` reads the oldest without removing
  # it, and `ack_part/2` removes it once it was handed to the broadcast.

  @type handle :: term()
  @type topic :: binary()
  @type key :: binary()
  @type reason :: :already_tracked | :not_tracked | :noproc | :stale | :meta_too_large
  @type grouped :: %{optional(key) => %{metas: [map()]}}
  @type part_id :: non_neg_integer()

  @callback new(keyword()) :: handle()
  @callback configure(handle(), keyword()) :: :ok
  @callback set_dispatcher(handle(), pid()) :: pending? :: boolean()
  # A pid that is no longer alive is answered `{:ok, phx_ref}` with nothing
  # kept, as Phoenix answers it: its presence is gone at once.
  @callback track(handle(), pid(), topic(), key(), map()) :: {:ok, binary()} | {:error, reason()}
  @callback untrack(handle(), pid(), topic(), key()) :: :ok
  @callback lookup(handle(), pid(), topic(), key()) ::
              {:ok, {map(), non_neg_integer()}} | {:error, :not_tracked}
  @callback update(handle(), pid(), topic(), key(), map(), non_neg_integer() | nil) ::
              {:ok, binary()} | {:error, reason()}
  @callback counts(handle(), topic()) ::
              {users :: non_neg_integer(), connections :: non_neg_integer()}
  @callback list(handle(), topic()) :: grouped()
  @callback get_by_key(handle(), topic(), key()) :: grouped() | []
  @callback take_diffs(handle(), max_topics :: pos_integer()) ::
              {queued_parts :: non_neg_integer(), still_pending :: non_neg_integer()}
  @callback next_part(handle()) ::
              {part_id(), topic(), joins :: grouped(), leaves :: grouped()} | :none
  @callback ack_part(handle(), part_id()) :: :ok
  @callback stats(handle()) :: %{atom() => non_neg_integer()}
  # Returns once every write made before the call has reached the table and
  # the dispatcher has been told of the diffs it made pending (for
  # fetchers_pids/0, which then waits for the dispatcher to be idle).
  @callback sync(handle()) :: :ok

  # Cluster mode (Drab.Presence.Cluster): this node's changes out as deltas,
  # other nodes' in as replicas, numbered by the receiving node.
  @type replica :: non_neg_integer()
  @callback set_replicator(handle(), pid() | nil) :: incarnation :: binary()
  @callback delta_seq(handle()) :: seq :: non_neg_integer()
  @callback take_delta(handle()) :: {seq :: pos_integer(), delta :: binary()} | :none
  @callback local_state(handle()) :: {seq :: non_neg_integer(), [delta :: binary()]}
  @callback apply_delta(handle(), replica(), binary()) :: :ok | {:error, :bad_delta}
  @callback sync_replica(handle(), replica(), [binary()]) :: :ok | {:error, :bad_delta}
  @callback drop_replica(handle(), replica()) :: dropped :: non_neg_integer()
  @callback replica_id(handle(), name :: binary()) :: replica()
  @callback replica_ids(handle()) :: [{name :: binary(), replica()}]
  @callback forget_replica(handle(), replica()) :: dropped :: non_neg_integer()
end
