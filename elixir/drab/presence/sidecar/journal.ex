defmodule Drab.Presence.Sidecar.Journal do
  @moduledoc false
  # The BEAM-side bookkeeping the sidecar's replies drive (the port owner
  # calls it for each successful reply): leaves the sidecar says are
  # delivered are owed no more; replicated presences (cluster mode) are
  # counted as local ones are, and remembered to be uncounted should the
  # sidecar die with them; the last delta seq handed out and the
  # dispatcher are kept for a restarted sidecar or port owner. And the
  # counts recomputed from all of it after a crash or a repair.
  require Drab.Presence.Sidecar.Wire

  alias Drab.Presence.Sidecar.{Table, Wire, Writes}

  @doc """
  Records what a successful reply to op `op` (for the process `to`) tells
  the BEAM side; returns the port owner's state, with the dispatcher a
  `set_dispatcher` named.
  """
  @spec record(byte(), non_neg_integer(), binary(), map()) :: map()
  def record(Wire.op(:set_dispatcher), to, _body, state) do
    dispatcher = Wire.id_pid(state.template, to)
    :ets.insert(state.table.replication, {:dispatcher, dispatcher})
    %{state | dispatcher: dispatcher}
  end

  # A take that started this node's delta pending (cluster mode) wakes the
  # replicator, as the NIF does itself.
  def record(
        Wire.op(:take_diffs),
        _to,
        <<_queued::64, _pending::64, delta_started, delivered::binary>>,
        state
      ) do
    delivered(state.table, delivered)

    if delta_started == 1 do
      case :ets.lookup(state.table.replication, :replicator) do
        [{:replicator, pid}] when is_pid(pid) -> send(pid, :drab_presence_delta)
        _ -> :ok
      end
    end

    state
  end

  # The last seq handed out, for a restarted sidecar to go on from.
  def record(Wire.op(:take_delta), _to, <<1, seq::64, _delta::binary>>, state) do
    :ets.insert(state.table.replication, {:seq, seq})
    state
  end

  # Replicated presences joined or left: counted as local ones are, and
  # remembered, to be uncounted should the sidecar die with them.
  def record(op, _to, <<flags, _dropped::64, n::32, changes::binary>>, state)
      when op in [
             Wire.op(:apply_delta),
             Wire.op(:sync_replica),
             Wire.op(:drop_replica),
             Wire.op(:forget_replica)
           ] do
    count_changes(state.table, n, changes)

    if Wire.wake?(flags) and state.dispatcher,
      do: send(state.dispatcher, :drab_presence_pending)

    state
  end

  def record(Wire.op(:ack_part), _to, <<_empty, delivered::binary>>, state) do
    delivered(state.table, delivered)
    state
  end

  def record(_op, _to, _body, state), do: state

  # Removals whose leaves subscribers have had (or never needed): a
  # restarted sidecar owes them no more.
  # A size checked in a guard, not written as binary-size(n * 8): Elixir
  # takes an expression as a size in a pattern from 1.14 on.
  defp delivered(table, <<n::32, refs::binary>>) when byte_size(refs) == n * 8 do
    for <<ref::64 <- refs>>, do: :ets.delete(table.leaves, ref)
    :ok
  end

  defp count_changes(_table, 0, <<>>), do: :ok

  defp count_changes(
         table,
         n,
         <<tl::32, topic::binary-size(tl), kl::32, key::binary-size(kl), change::signed-64,
           rest::binary>>
       ) do
    {topic, key} = {:binary.copy(topic), :binary.copy(key)}
    Writes.count(table.counts, topic, key, change)

    if :ets.update_counter(
         table.replication,
         {:remote, topic, key},
         change,
         {{:remote, topic, key}, 0}
       ) ==
         0,
       do: :ets.delete(table.replication, {:remote, topic, key})

    count_changes(table, n - 1, rest)
  end

  @doc """
  Counts from the journal and the replicated presences, written while no
  writer runs: what a killed writer may have left half counted is counted
  again.
  """
  @spec recount(Table.t()) :: :ok
  def recount(table) do
    :ets.delete_all_objects(table.counts)

    for {{_owner, topic, key}, _ref, _meta, _prev} <- :ets.tab2list(table.journal) do
      Writes.count(table.counts, topic, key, 1)
    end

    for {{:remote, topic, key}, n} <- :ets.match_object(table.replication, {{:remote, :_, :_}, :_}) do
      Writes.count(table.counts, topic, key, n)
    end

    :ok
  end
end
