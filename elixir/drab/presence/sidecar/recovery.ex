defmodule Drab.Presence.Sidecar.Recovery do
  @moduledoc false
  # Bringing a sidecar back to the journal, in pauses during which no
  # writer is half way: after a new sidecar starts (replay every live
  # presence under a new ref, owe the leaves of the rest, resume cluster
  # replication past the last delta handed out), and when a writer was
  # killed holding an owner's lock (that owner resynced). Every function
  # takes the port owner's state (`table`, `port`, `template`).
  require Logger

  alias Drab.Presence.Sidecar.{Journal, Lifecycle, Table, Wire, Writes}
  alias Drab.Presence.Telemetry

  @replay_batch 2_000
  # How long a pause waits for live writers to let go before it says so.
  @quiesce_ms 5_000

  @doc """
  Cluster mode across a sidecar's death. Its replicas of other nodes died
  with it: their counts go, and the replicator resyncs every peer once the
  new sidecar is up (`replicas_lost/1`). This node's own numbering goes on
  past the last delta handed out, skipping one: peers see a gap (or a
  heartbeat ahead of what they applied) and resync this node's full state,
  which holds the replayed presences under their new refs.
  """
  @spec resume_replication(map()) :: :ok | {:error, String.t()}
  def resume_replication(%{table: table} = state) do
    :ets.match_delete(table.replication, {{:remote, :_, :_}, :_})

    case :ets.lookup(table.replication, :replicator) do
      [{:replicator, pid}] when is_pid(pid) ->
        seq = :ets.update_counter(table.replication, :seq, 1)
        Lifecycle.sync(state.port, :set_replicator, <<1, seq::64>>)

      _ ->
        :ok
    end
  end

  @doc "Tells the replicator that a restarted sidecar lost its replicas of other nodes."
  @spec replicas_lost(map()) :: :ok
  def replicas_lost(%{table: table, epoch: epoch}) do
    case :ets.lookup(table.replication, :replicator) do
      [{:replicator, pid}] when is_pid(pid) and epoch > 1 ->
        send(pid, :drab_presence_replicas_lost)
        :ok

      _ ->
        :ok
    end
  end

  @doc """
  Returns once no live writer holds a lock: no write is half way, and the
  journal may be read whole. Writers take their owner's lock only while
  the port is published, and let go when they find it is not, so once no
  live process holds a lock, every decided write is in the journal and
  none is on its way. Going on while a live writer is half way would lose
  its write: this waits as long as it takes (a writer gives up a lock it
  cannot use in Writes' own time limit), saying so now and then.
  """
  @spec quiesce(Table.t()) :: :ok
  def quiesce(table), do: quiesce(table, System.monotonic_time(:millisecond), false)

  defp quiesce(table, since, said?) do
    if Enum.all?(:ets.tab2list(table.locks), fn {_owner, writer} -> not Process.alive?(writer) end) do
      :ok
    else
      waited = System.monotonic_time(:millisecond) - since
      say? = waited > @quiesce_ms and not said?

      if say?,
        do: Logger.error("Drab.Presence sidecar: writers still hold locks after #{waited} ms")

      Process.sleep(1)
      quiesce(table, since, said? or say?)
    end
  end

  @doc "Lets go of the locks of writers that died holding them."
  @spec drop_dead_locks(Table.t()) :: :ok
  def drop_dead_locks(table) do
    for {_owner, writer} = lock <- :ets.tab2list(table.locks),
        not Process.alive?(writer),
        do: :ets.delete_object(table.locks, lock)

    :ok
  end

  @doc """
  Owners whose writer was killed holding their lock: writes pause, each
  such owner's presences are resynced into the sidecar under new refs (the
  old ones leave), or removed if the owner is gone, and everything is
  counted again.
  """
  @spec repair_locks(map()) :: map()
  def repair_locks(%{port: nil} = state), do: state

  def repair_locks(state) do
    table = state.table
    dead = for {owner, writer} <- :ets.tab2list(table.locks), not Process.alive?(writer), do: owner

    if dead != [] do
      Table.publish(table, state.epoch, nil)
      :ok = quiesce(table)
      Enum.each(dead, &resync_owner(state, &1))
      Journal.recount(table)
      Table.publish(table, state.epoch, state.port)

      Logger.error(
        "Drab.Presence sidecar: resynced #{length(dead)} owner(s) whose writer was killed mid-write"
      )

      Telemetry.execute([:sidecar, :resync], %{owners: length(dead)}, %{module: table.module})
    end

    state
  end

  defp resync_owner(state, owner) do
    table = state.table
    pid = Wire.id_pid(state.template, owner)
    rows = Writes.owner_rows(table, owner)
    old_refs = for {_, ref, _, _} <- rows, do: ref

    tracks =
      if Process.alive?(pid) do
        for {{_, topic, key} = row, old, meta, _prev} <- rows do
          ref = Writes.new_ref(table)
          :ets.insert(table.leaves, {old, topic, key, meta})
          :ets.insert(table.journal, {row, ref, meta, nil})
          Wire.track_frame(owner, topic, key, ref, meta)
        end
      else
        Writes.drop_rows(table, owner)
        []
      end

    if tracks != [], do: Writes.notify(Table.monitor_for(table, owner), {:watch, owner})

    exit = Wire.exit_frame([{owner, old_refs}])

    # One frame per command: the port adds each one's length prefix.
    Enum.each([exit | tracks], &Port.command(state.port, &1))
    :ets.delete(table.locks, owner)
  rescue
    # The port closed under us: the restart replays the journal.
    ArgumentError -> :ets.delete(state.table.locks, owner)
  end

  @doc """
  Replays the journal into a new sidecar: every presence of a live owner
  goes back in under a new ref, with the leave of its old ref owed to
  subscribers after its new join; presences of owners that died
  meanwhile, and removals whose leaves were not known delivered, are owed
  as leaves only.
  """
  @spec replay(map()) :: :ok | {:error, String.t()}
  def replay(state) do
    table = state.table
    {live, dead} = :ets.tab2list(table.journal) |> Enum.split_with(&alive?(state, &1))

    for {{_owner, topic, key} = row, ref, meta, _prev} <- dead do
      :ets.delete(table.journal, row)
      :ets.insert(table.leaves, {ref, topic, key, meta})
    end

    owed = :ets.tab2list(table.leaves)

    replayed =
      for {row, old, meta, _prev} <- live do
        ref = Writes.new_ref(table)
        :ets.insert(table.journal, {row, ref, meta, nil})
        {row, old, ref, meta}
      end

    with :ok <- replay_tracks(state, replayed),
         :ok <- send_leaves(state, owed) do
      # The old refs of the replayed presences are owed too, should this
      # sidecar die before they go out.
      for {{_owner, topic, key}, old, _ref, meta} <- replayed,
          do: :ets.insert(table.leaves, {old, topic, key, meta})

      :ok
    end
  end

  defp alive?(state, {{owner, _, _}, _, _, _}),
    do: Process.alive?(Wire.id_pid(state.template, owner))

  defp replay_tracks(state, entries) do
    entries
    |> Enum.chunk_every(@replay_batch)
    |> Enum.reduce_while(:ok, fn batch, :ok ->
      body = [
        <<length(batch)::32>>
        | for {{owner, topic, key}, old, ref, meta} <- batch do
            [<<owner::64>>, Wire.str(topic), Wire.str(key), <<old::64, ref::64>>, Wire.str(meta)]
          end
      ]

      case Lifecycle.sync(state.port, :replay, body) do
        :ok -> {:cont, :ok}
        {:error, _} = error -> {:halt, error}
      end
    end)
  end

  defp send_leaves(_state, []), do: :ok

  defp send_leaves(state, owed) do
    owed
    |> Enum.chunk_every(@replay_batch)
    |> Enum.reduce_while(:ok, fn batch, :ok ->
      body = [
        <<length(batch)::32>>
        | for {ref, topic, key, meta} <- batch do
            [Wire.str(topic), Wire.str(key), <<ref::64>>, Wire.str(meta)]
          end
      ]

      case Lifecycle.sync_body(state.port, :recovery_leaves, body) do
        {:ok, _} -> {:cont, :ok}
        error -> {:halt, error}
      end
    end)
  end

  @doc "Names the dispatcher to a new sidecar, and wakes it if diffs are pending."
  @spec set_dispatcher(map()) :: :ok
  def set_dispatcher(state) do
    id = Wire.pid_id(state.dispatcher)

    case Lifecycle.sync_body(state.port, :set_dispatcher, <<id::64>>) do
      {:ok, <<1>>} ->
        send(state.dispatcher, :drab_presence_pending)
        :ok

      _ ->
        :ok
    end
  end
end
