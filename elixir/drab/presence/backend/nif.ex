defmodule Drab.Presence.Backend.NIF do
  @moduledoc false
  # The table in this VM, behind Drab.Presence.Native.
  @behaviour Drab.Presence.Backend

  alias Drab.Presence.{Native, Options}

  @impl true
  def new(_module, opts) do
    table = Native.table_new(Keyword.fetch!(opts, :max_meta_bytes))
    :ok = Native.table_set_diff_per_operation(table, Options.diff_per_operation?(opts))
    table
  end

  @impl true
  def configure(table, opts) do
    :ok = Native.table_configure(table, Keyword.fetch!(opts, :max_meta_bytes))
    Native.table_set_diff_per_operation(table, Options.diff_per_operation?(opts))
  end

  @impl true
  defdelegate set_dispatcher(table, pid), to: Native, as: :table_set_dispatcher

  # The NIFs that run on the caller's scheduler answer :busy, having done
  # nothing, when the table lock is held for more than a few microseconds
  # (Native's `Shared::try_lock`): the caller yields to the scheduler's
  # other processes and calls again, instead of the NIF parking the
  # scheduler's thread.
  @impl true
  def track(table, pid, topic, key, meta),
    do: unbusy(:table_track, [table, pid, topic, key, meta])

  @impl true
  def untrack(table, pid, topic, key), do: unbusy(:table_untrack, [table, pid, topic, key])

  @impl true
  def lookup(table, pid, topic, key), do: unbusy(:table_lookup, [table, pid, topic, key])

  @impl true
  def update(table, pid, topic, key, meta, expected_ref),
    do: unbusy(:table_update, [table, pid, topic, key, meta, expected_ref])

  @impl true
  def counts(table, topic), do: unbusy(:table_counts, [table, topic])

  # Small listings are built on the calling scheduler; the NIF answers
  # :too_large when one is big enough (presences or bytes) to belong on a
  # dirty scheduler.
  @impl true
  def list(table, topic) do
    inline_or_dirty(unbusy(:table_list, [table, topic]), fn ->
      Native.table_list_dirty(table, topic)
    end)
  end

  @impl true
  def get_by_key(table, topic, key) do
    inline_or_dirty(
      unbusy(:table_get_by_key, [table, topic, key]),
      fn -> Native.table_get_by_key_dirty(table, topic, key) end
    )
  end

  # The normal case runs on the dispatcher's scheduler: a dirty round trip
  # per part would cost more than the work on a busy node.
  @impl true
  def take_diffs(table, max_topics) do
    inline_or_dirty(
      unbusy(:table_take_diffs, [table, max_topics]),
      fn -> Native.table_take_diffs_dirty(table, max_topics) end
    )
  end

  @impl true
  def next_part(table) do
    inline_or_dirty(unbusy(:table_next_part, [table]), fn -> Native.table_next_part_dirty(table) end)
  end

  @impl true
  defdelegate ack_part(table, id), to: Native, as: :table_ack_part

  @impl true
  defdelegate stats(table), to: Native, as: :table_stats

  # Writes are in the table, and have sent their wake-ups, when they return.
  @impl true
  def sync_writes(_table), do: :ok

  @impl true
  defdelegate set_replicator(table, pid), to: Native, as: :replication_set_replicator

  @impl true
  def delta_seq(table), do: unbusy(:replication_delta_seq, [table])

  @impl true
  def take_delta(table), do: unbusy(:replication_take_delta, [table])

  @impl true
  defdelegate local_state(table), to: Native, as: :replication_local_state

  @impl true
  def apply_delta(table, replica, delta) do
    inline_or_dirty(
      unbusy(:replication_apply_delta, [table, replica, delta]),
      fn -> Native.replication_apply_delta_dirty(table, replica, delta) end
    )
  end

  @impl true
  defdelegate sync_replica(table, replica, chunks), to: Native, as: :replication_sync_replica

  @impl true
  defdelegate drop_replica(table, replica), to: Native, as: :replication_drop_replica

  @impl true
  defdelegate replica_id(table, name), to: Native, as: :replication_replica_id

  @impl true
  defdelegate replica_ids(table), to: Native, as: :replication_replica_ids

  @impl true
  defdelegate forget_replica(table, replica), to: Native, as: :replication_forget_replica

  # Yields to the scheduler's other processes before each new try.
  defp unbusy(function, args) do
    case apply(Native, function, args) do
      :busy ->
        :erlang.yield()
        unbusy(function, args)

      result ->
        result
    end
  end

  # Each such NIF does the work on the caller's scheduler when it is small,
  # and answers :too_large, having taken nothing, when it belongs on a dirty one.
  defp inline_or_dirty(:too_large, dirty), do: dirty.()
  defp inline_or_dirty(result, _dirty), do: result
end
